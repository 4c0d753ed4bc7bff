"""Start-up under ZeRO-1/2: the model built on the meta device and materialised once in the compute dtype;
--init-from read tensor by tensor without a memory map. Peak host memory against the bytes a rank holds."""

import json
import math
import subprocess
import sys
import weakref

import pytest
import torch

from lvm.model.presets import llama_config
from lvm.train import init_from
from lvm.train.engine import build_model
from tests.train.conftest import ENV, REPO

ZERO2 = {"zero_optimization": {"stage": 2}}


def eager(cfg, seed=0):
    """The model as build_model made it before: whole, fp32, on the host, initialised by its constructor."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")


def loss_on(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def test_materialised_model_has_the_eager_init_and_rope_buffers():
    cfg = llama_config("tiny", 256)
    ref = eager(cfg)
    torch.manual_seed(0)
    model, _ = build_model(cfg, ZERO2, False)
    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    assert all(p.device.type == "cpu" for p in got.values())
    std = cfg.initializer_range
    for k, p in got.items():
        if "norm" in k:
            assert torch.equal(p, torch.ones_like(p)), k
        else:  # normal(0, initializer_range) as the eager model's (same init, another draw)
            assert abs(p.std().item() - std) < 0.05 * std and abs(p.mean().item()) < 0.05 * std, k
            assert abs(p.std().item() - want[k].std().item()) < 0.05 * std, k
    bufs, ref_bufs = dict(model.named_buffers()), dict(ref.named_buffers())
    assert set(bufs) == set(ref_bufs) == {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
    for k in bufs:
        assert bufs[k].dtype == torch.float32 and torch.equal(bufs[k], ref_bufs[k]), k
    # the initial loss: the same distribution (both at ln(vocab) within what the init's logits move it)
    ids = torch.randint(0, 8192, (4, 128), generator=torch.Generator().manual_seed(1))
    a, b = loss_on(model, ids), loss_on(ref, ids)
    assert abs(a - math.log(cfg.vocab_size)) < 0.05 and abs(a - b) < 0.02, (a, b)
    # the same seed draws the same model
    torch.manual_seed(0)
    again, _ = build_model(cfg, ZERO2, False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True))


def test_compute_dtype_and_uninitialised_build_keep_fp32_rope_buffers():
    cfg = llama_config("tiny", 256)
    ref_bufs = dict(eager(cfg).named_buffers())
    for init in (True, False):
        model, _ = build_model(cfg, ZERO2, False, dtype=torch.bfloat16, init=init)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        for k, b in model.named_buffers():  # to_empty leaves them as garbage: recomputed from the config
            assert b.dtype == torch.float32 and torch.equal(b, ref_bufs[k]), (init, k)
    tied = llama_config("tiny", 256)
    tied.tie_word_embeddings = True
    model, _ = build_model(tied, ZERO2, False, init=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def save_folder(path, cfg, dtype, seed=3):
    torch.manual_seed(seed)
    model, _ = build_model(cfg, ZERO2, False, dtype=dtype)
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_init_from_reads_tensor_by_tensor_into_the_parameters(tmp_path, monkeypatch):
    cfg = llama_config("tiny", 256)
    cfg.vocab_size = 8292
    folder = tmp_path / "hf"
    want = save_folder(folder, cfg, torch.bfloat16)
    import safetensors

    def no_map(*a, **k):
        raise AssertionError("safe_open memory-maps the whole file: its pages stay resident until it is closed")

    monkeypatch.setattr(safetensors, "safe_open", no_map)
    reads = []  # (tensors read so far still alive, was the parameter itself) at each read
    real = init_from.SafetensorsReader.read

    def counting(self, name, into=None):
        alive = sum(r() is not None for r, _ in reads)
        t = real(self, name, into)
        reads.append((weakref.ref(t), alive))
        return t

    monkeypatch.setattr(init_from.SafetensorsReader, "read", counting)
    # the file's dtype: every tensor read straight into its parameter (nothing else allocated)
    model, _ = build_model(init_from.read_config(folder, 256), ZERO2, False, dtype=torch.bfloat16, init=False)
    params = dict(model.named_parameters())
    ptrs = {k: p.data_ptr() for k, p in params.items()}
    assert init_from.load_weights(model, folder, 0) == len(params)
    assert all(p.data_ptr() == ptrs[k] for k, p in params.items())
    assert all(torch.equal(p, want[k]) for k, p in params.items())
    # another dtype (fp32 on CPU): one temporary at a time, each gone before the next is read
    reads.clear()
    model, _ = build_model(init_from.read_config(folder, 256), ZERO2, False, init=False)
    init_from.load_weights(model, folder, 0)
    assert len(reads) == len(params) and max(alive for _, alive in reads) == 0
    assert all(torch.equal(p, want[k].float()) for k, p in model.named_parameters())


def peak(case, dtype, folder=None):
    cmd = [sys.executable, "bench/bench_startup.py", "--worker", case, "--model", "100m", "--dtype", dtype]
    r = subprocess.run(cmd + (["--folder", str(folder)] if folder else []), cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    return (m["hwm_kib"] - m["base_kib"]) * 1024 / m["held_bytes"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_peak_host_memory_of_build_and_init_from_is_what_the_rank_holds(tmp_path, dtype):
    """VmHWM above the process's memory before the model, over its parameter and buffer bytes (100m preset):
    building in the compute dtype, and building uninitialised then loading a bf16 safetensors folder."""
    folder = tmp_path / "hf-100m"
    save_folder(folder, llama_config("100m", 256), torch.bfloat16)
    assert peak("meta", dtype) <= 1.3
    assert peak("meta", dtype, folder) <= 1.3
