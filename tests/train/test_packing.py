import numpy as np
import torch
from transformers import LlamaForCausalLM

from lvm.data.packing import DistributedLoader, PackedWindows, best_fit
from lvm.data.shards import load_sentences, write_shard
from lvm.model.presets import llama_config
from lvm.model.vocab import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID


def make_table(tmp_path, n_images):
    rng = np.random.default_rng(0)
    rows = [{"tokens": rng.integers(0, 8192, 256 * k, dtype=np.uint16), "n_images": k, "kind": "video", "id": f"s{i}"}
            for i, k in enumerate(n_images)]
    write_shard(tmp_path / "t-0.arrow", rows)
    return load_sentences(tmp_path)


def test_concat_windows_cover_the_stream_in_order(tmp_path):
    table = make_table(tmp_path, [1, 2, 3, 1])
    w = PackedWindows(table, seq_len=300, mode="concat", seed=1)
    stream = np.concatenate([w.window(g)[0] for g in range(w.per_epoch)])
    order = np.random.default_rng([1, 0]).permutation(4)
    expect = np.concatenate([np.concatenate([[BOS_ID], table.sentence(i), [EOS_ID]]) for i in order])
    assert np.array_equal(stream, expect[: len(stream)])
    assert w.per_epoch == len(expect) // 300


def test_ranks_read_disjoint_windows_and_resume_exactly(tmp_path):
    table = make_table(tmp_path, [1, 2, 3, 1, 2, 2])
    w = PackedWindows(table, 256, "concat", 0)
    r0, r1 = DistributedLoader(w, 2, 0, 2), DistributedLoader(w, 2, 1, 2)
    a, b = r0.next_batch().input_ids, r1.next_batch().input_ids
    assert torch.equal(a[0], torch.from_numpy(w.window(0)[0])) and torch.equal(b[0], torch.from_numpy(w.window(2)[0]))
    ref = DistributedLoader(w, 2, 0, 2)
    for _ in range(5):
        ref.next_batch()
    expected = ref.next_batch().input_ids
    fresh = DistributedLoader(w, 2, 0, 2)
    state = {**r0.state_dict(), "windows_consumed": 20}
    fresh.load_state_dict(state)
    assert torch.equal(fresh.next_batch().input_ids, expected)


def test_best_fit_never_splits_and_respects_capacity():
    lengths = np.array([10, 7, 5, 5, 3, 2, 9])
    bins = best_fit(lengths, np.arange(7), capacity=12)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(lengths[b].sum() <= 12 for b in bins)


def test_sentence_mode_logits_equal_alone(tmp_path):
    """Packed sentences with restarting position_ids attend only within themselves."""
    table = make_table(tmp_path, [1, 1, 2])
    w = PackedWindows(table, seq_len=1100, mode="sentence", seed=0)  # 258 + 258 + 514 tokens fit in one window
    ids, labels, pos = w.window(0)
    assert (labels[ids == PAD_ID] == IGNORE_INDEX).all() and (labels[ids == BOS_ID] == IGNORE_INDEX).all()
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(llama_config("tiny", 1100), attn_implementation="sdpa").eval()
    with torch.no_grad():
        packed = model(input_ids=torch.from_numpy(ids)[None], position_ids=torch.from_numpy(pos)[None], use_cache=False).logits[0]
    starts = np.flatnonzero(ids == BOS_ID)
    for s in starts:
        n = int(np.flatnonzero(ids[s:] == EOS_ID)[0]) + 1
        with torch.no_grad():
            alone = model(input_ids=torch.from_numpy(ids[s : s + n])[None], use_cache=False).logits[0]
        assert torch.allclose(packed[s : s + n], alone, atol=1e-5)
    assert len(starts) == 3
