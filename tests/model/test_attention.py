"""Packed windows keep their sentences apart under every attention path, in every row of a micro-batch.

The windows come from the real sentence packing (`SourceWindows`, `DistributedLoader`, micro-batch 3); the
model is a real (tiny) LlamaForCausalLM. flash-attn cannot run on a CPU, so its varlen path is checked
through transformers' attention interface with a reference implementation that runs causal SDPA on each
`cu_seq_lens` segment of the flattened micro-batch: the same keyword arguments, from the same function
(`varlen_kwargs`), reach it through the model as reach `flash_attn_varlen_func` on a GPU."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaForCausalLM

from lvm.data.mixture import DistributedLoader
from lvm.data.shards.format import write_shard
from lvm.data.shards.shard_set import open_shards
from lvm.data.windows.source import SourceWindows
from lvm.model.attention import (
    block_causal_mask,
    packed_attention_kwargs,
    resolve_attention,
    segment_ids,
    varlen_kwargs,
)
from lvm.model.presets import llama_config
from lvm.model.vocab import BOS_ID, EOS_ID, PAD_ID

L = 800  # three one-image sentences (258 tokens) or one of two images and one of one fit a window


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """What flash_attn_varlen_func computes, in plain SDPA: causal attention inside each cu_seq_lens segment
    of the micro-batch flattened to B*L tokens; without them, causal attention over each whole row."""
    b, h, n, d = query.shape
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2), None
    assert torch.equal(cu_seq_lens_q, cu_seq_lens_k) and max_length_q == max_length_k == n
    assert cu_seq_lens_q.dtype == torch.int32 and int(cu_seq_lens_q[-1]) == b * n
    q, k, v = (x.transpose(1, 2).reshape(b * n, h, d) for x in (query, key, value))
    out = torch.empty_like(q)
    cu = cu_seq_lens_q.tolist()
    for a, e in zip(cu[:-1], cu[1:], strict=True):
        seg = [x[a:e].transpose(0, 1)[None] for x in (q, k, v)]
        out[a:e] = F.scaled_dot_product_attention(*seg, is_causal=True, scale=scaling)[0].transpose(0, 1)
    return out.view(b, n, h, d), None


AttentionInterface.register("lvm_varlen_reference", varlen_reference)


@pytest.fixture(scope="module")
def packed_batch(tmp_path_factory):
    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("packed")
    rows = [{"tokens": rng.integers(0, 8192, 256 * k, dtype=np.uint16), "n_images": k, "kind": "video", "id": f"s{i}"}
            for i, k in enumerate([1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 2])]
    write_shard(folder / "part-000.arrow", rows)
    windows = SourceWindows(open_shards(folder), L, "sentence", seed=0)
    b = DistributedLoader(windows, micro_batch=3).next_batch()
    assert b.input_ids.shape == (3, L) and b.position_ids is not None
    return b


def sentences_of(ids: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of every [BOS] ... [EOS] sentence in a window."""
    out = []
    for s in np.flatnonzero(ids == BOS_ID):
        out.append((int(s), int(np.flatnonzero(ids[s:] == EOS_ID)[0]) + 1))
    return out


def tiny(impl: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(llama_config("tiny", L), attn_implementation=impl).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager", "lvm_varlen_reference"])
def test_packed_rows_equal_each_sentence_alone(packed_batch, impl):
    b = packed_batch
    model = tiny(impl)
    kwargs = packed_attention_kwargs(b.position_ids, "flash_attention_2" if impl == "lvm_varlen_reference" else impl,
                                     torch.float32)
    with torch.no_grad():
        packed = model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False, **kwargs).logits
    n_sentences = 0
    per_row = []
    for r in range(3):
        found = sentences_of(b.input_ids[r].numpy())
        per_row.append(len(found))
        for s, n in found:
            with torch.no_grad():
                alone = model(input_ids=b.input_ids[r, s : s + n][None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[r, s : s + n], alone, atol=2e-5, rtol=1e-4)
            n_sentences += 1
    assert n_sentences >= 6 and max(per_row) >= 3  # several sentences share every row


def test_without_the_packing_later_sentences_see_earlier_ones(packed_batch):
    """The control: plain causal attention over a row (flash-attention's path for a micro-batch > 1 when
    the packing is left to transformers' guess from position_ids) changes the logits of later sentences."""
    b = packed_batch
    model = tiny("lvm_varlen_reference")
    with torch.no_grad():
        plain = model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits
    s, n = sentences_of(b.input_ids[0].numpy())[1]
    with torch.no_grad():
        alone = model(input_ids=b.input_ids[0, s : s + n][None], use_cache=False).logits[0]
    assert (plain[0, s : s + n] - alone).abs().max() > 1e-3


def test_no_token_attends_across_sentences(packed_batch):
    """Changing every token of one sentence leaves every other sentence's logits exactly as they were."""
    b = packed_batch
    model = tiny("sdpa")
    ids = b.input_ids.clone()
    s, n = sentences_of(ids[1].numpy())[0]
    ids[1, s + 1 : s + n - 1] = (ids[1, s + 1 : s + n - 1] + 17) % 8192
    run = [model(input_ids=x, position_ids=b.position_ids, use_cache=False,
                 **packed_attention_kwargs(b.position_ids, "sdpa", torch.float32)).logits for x in (b.input_ids, ids)]
    other = torch.ones(3, L, dtype=torch.bool)
    other[1, s : s + n] = False
    assert torch.equal(run[0][other], run[1][other])
    assert not torch.equal(run[0][1, s + 1 : s + n], run[1][1, s + 1 : s + n])


def test_varlen_arguments_and_mask_by_hand():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    assert segment_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]]
    kw = varlen_kwargs(pos)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8, 12] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["max_length_q"] == kw["max_length_k"] == 6
    m = block_causal_mask(pos, torch.float32)[:, 0] == 0
    assert m.shape == (2, 6, 6)
    assert m[0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                   [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    # a row that does not start at position 0 (a window cut from a stream) is still one segment at its start
    assert varlen_kwargs(torch.tensor([[3, 4, 0, 1]]))["cu_seq_lens_q"].tolist() == [0, 2, 4]
    assert packed_attention_kwargs(None, "sdpa", torch.float32) == {}
    assert block_causal_mask(pos, torch.bfloat16).dtype == torch.bfloat16


def test_attention_choice_falls_back_with_one_line():
    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu, torch.float32) == ("sdpa", None)
    assert resolve_attention("eager", cpu, torch.float32) == ("eager", None)
    impl, note = resolve_attention("flash_attention_2", cpu, torch.bfloat16)
    assert impl == "sdpa" and note.startswith("--attention flash_attention_2: ") and note.endswith("; using sdpa")
    assert "\n" not in note and ("not installed" in note or "CUDA" in note)
    with pytest.raises(ValueError, match="--attention"):
        resolve_attention("flash3", cpu, torch.float32)


@pytest.fixture
def fake_flash_attn(tmp_path, monkeypatch):
    """Install a stand-in `flash_attn` package with the given __init__ for one test; gone (module too) after it."""
    def install(body: str):
        pkg = tmp_path / "flash_attn"
        pkg.mkdir()
        (pkg / "__init__.py").write_text(body)
        monkeypatch.syspath_prepend(str(tmp_path))
        sys.modules.pop("flash_attn", None)

    yield install
    sys.modules.pop("flash_attn", None)


def test_a_flash_attn_that_cannot_load_falls_back_with_one_line(fake_flash_attn):
    """A flash-attn wheel built for another torch installs, then fails to import (its CUDA extension's symbols):
    the choice falls back to sdpa with one line instead of a model that fails at its first forward pass."""
    fake_flash_attn('raise ImportError("/x/flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")\n')
    for dev in (torch.device("cpu"), torch.device("cuda", 0)):
        impl, note = resolve_attention("flash_attention_2", dev, torch.bfloat16)
        assert impl == "sdpa" and "\n" not in note and note.endswith("; using sdpa")
        assert "the installed flash-attn cannot be imported (ImportError: " in note and "undefined symbol" in note
    assert resolve_attention("auto", torch.device("cuda", 0), torch.bfloat16) == ("sdpa", None)


def test_a_flash_attn_transformers_refuses_falls_back_with_one_line(fake_flash_attn, monkeypatch):
    """An importable flash-attn that transformers will not build a flash_attention_2 model with (too old, another
    distribution): sdpa and one line, on an Ampere-or-later GPU in bf16 (its capability given here)."""
    fake_flash_attn('__version__ = "2.0.4"\ndef flash_attn_func(*a, **k): pass\ndef flash_attn_varlen_func(*a, **k): pass\n')
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    from transformers.utils import is_flash_attn_2_available

    assert not is_flash_attn_2_available()
    impl, note = resolve_attention("flash_attention_2", torch.device("cuda", 0), torch.bfloat16)
    assert impl == "sdpa" and "transformers does not accept this flash-attn (2.0.4;" in note and "\n" not in note
    with pytest.raises(ImportError):  # what building the model with the unchecked choice would have done
        LlamaForCausalLM._from_config(llama_config("tiny", 64), attn_implementation="flash_attention_2")


def test_pad_is_no_work_in_the_packing(packed_batch):
    from lvm.train.metrics import window_work

    b = packed_batch
    tokens, sum_sq = window_work(b.input_ids, b.position_ids, PAD_ID)
    assert tokens == int((b.input_ids != PAD_ID).sum()) < b.input_ids.numel()
    expect = sum(n * n for r in range(3) for _, n in sentences_of(b.input_ids[r].numpy()))
    assert sum_sq == expect

