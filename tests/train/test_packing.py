"""Windows of one source: every sentence once per epoch, directly addressable, shuffled across shards."""

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from lvm.data.mixture import DistributedLoader, MixtureWindows
from lvm.data.packing import SourceWindows, best_fit, bin_types, feistel
from lvm.data.shards import open_shards, write_shard
from lvm.model.presets import llama_config
from lvm.model.vocab import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID


def write_source(folder, n_images_per_shard, seed=0, kind="video"):
    """Shards of random sentences; returns {token bytes: (shard, index)} of every sentence."""
    rng = np.random.default_rng(seed)
    sentences = {}
    for s, n_images in enumerate(n_images_per_shard):
        rows = [{"tokens": rng.integers(0, 8192, 256 * k, dtype=np.uint16), "n_images": k, "kind": kind, "id": f"{s}-{i}"}
                for i, k in enumerate(n_images)]
        write_shard(folder / f"part-{s:03d}.arrow", rows)
        sentences.update({r["tokens"].tobytes(): (s, i) for i, r in enumerate(rows)})
    return open_shards(folder), sentences


def split_sentences(stream):
    """Complete [BOS] ... [EOS] sentences of a token stream, as uint16 bytes."""
    bos, eos = np.flatnonzero(stream == BOS_ID), np.flatnonzero(stream == EOS_ID)
    out = []
    for b in bos:
        e = eos[eos > b]
        if len(e):
            out.append(stream[b + 1 : e[0]].astype(np.uint16).tobytes())
    return out


def test_feistel_is_a_keyed_bijection():
    for n in (1, 2, 3, 7, 64, 1000, 4099):
        for key in (0, 1, 12345):
            perm = [feistel(i, n, key) for i in range(n)]
            assert sorted(perm) == list(range(n))
    a = [feistel(i, 1000, 1) for i in range(1000)]
    assert a != [feistel(i, 1000, 2) for i in range(1000)] and a != list(range(1000))


def test_concat_epoch_holds_every_sentence_once(tmp_path):
    rng = np.random.default_rng(1)
    shards, sentences = write_source(tmp_path, [rng.integers(1, 4, rng.integers(3, 12)).tolist() for _ in range(7)])
    w = SourceWindows(shards, seq_len=300, mode="concat", seed=3)
    assert w.per_epoch == (int(shards.tokens.sum()) + 2 * len(shards)) // 300
    stream = np.concatenate([w.window_at(0, p)[0] for p in range(w.per_epoch)])
    found = split_sentences(stream)
    assert len(found) == len(set(found)) and set(found) <= set(sentences)
    assert len(found) >= len(sentences) - 2  # all but the epoch's cut-off tail
    # the read order visits every window of the epoch once, and window i of the source is that order
    reads = [w.read_position(0, i) for i in range(w.per_epoch)]
    assert sorted(reads) == list(range(w.per_epoch)) and reads != sorted(reads)
    for i in (0, 5, w.per_epoch - 1):
        assert np.array_equal(w.window(i)[0], w.window_at(0, reads[i])[0])
    # another epoch: another order of the same sentences
    stream1 = np.concatenate([w.window_at(1, p)[0] for p in range(w.per_epoch)])
    found1 = split_sentences(stream1)
    assert found1 != found and len(set(found1) & set(found)) >= len(found) - 3


def test_consecutive_windows_come_from_different_shards(tmp_path):
    shards, sentences = write_source(tmp_path, [[1] * 40 for _ in range(20)])
    w = SourceWindows(shards, seq_len=258 * 2, mode="concat", seed=0)  # two whole sentences per window
    src = []
    for i in range(w.per_epoch):
        first = split_sentences(w.window(i)[0])[0]
        src.append(sentences[first][0])
    same = np.mean([a == b for a, b in zip(src, src[1:], strict=False)])
    assert same < 0.3, same  # in shard order it would be ~0.95
    assert len(set(src[:16])) >= 6


def test_bin_types_equal_item_by_item_best_fit():
    for trial in range(200):
        r = np.random.default_rng(trial)
        lengths = r.integers(1, 140, r.integers(1, 80))
        cap = int(r.integers(40, 120))
        ref = best_fit(lengths, np.arange(len(lengths)), cap)
        u, c = np.unique(lengths, return_counts=True)
        lens, comps, mult = bin_types(dict(zip(u.tolist(), c.tolist(), strict=True)), cap)
        assert sum(mult) == len(ref), trial
        assert all(sum(a * ln for a, ln in zip(comp, lens, strict=True)) <= cap for comp in comps)
        packed = {ln: sum(m * comp[k] for comp, m in zip(comps, mult, strict=True)) for k, ln in enumerate(lens)}
        want = {}
        for x in lengths.tolist():
            want[min(x, cap)] = want.get(min(x, cap), 0) + 1
        assert packed == want


def test_sentence_mode_packs_each_sentence_once_per_epoch(tmp_path):
    rng = np.random.default_rng(2)
    shards, sentences = write_source(tmp_path, [rng.integers(1, 7, rng.integers(2, 15)).tolist() for _ in range(6)])
    L = 1100  # a 5-image sentence (1282 tokens) is truncated to the window
    w = SourceWindows(shards, seq_len=L, mode="sentence", seed=0)
    ref = sum(len(best_fit(shards.shard(j).lengths() + 2, np.arange(len(shards.shard(j))), L)) for j in range(shards.n_shards))
    assert w.per_epoch == ref
    for e in (0, 1):
        seen = []
        for p in range(w.per_epoch):
            ids, labels, pos = w.window_at(e, p)
            s, members = w.bin_sentences(e, p)
            seen += [(s, int(i)) for i in members]
            assert (labels[ids == PAD_ID] == IGNORE_INDEX).all() and (labels[ids == BOS_ID] == IGNORE_INDEX).all()
            starts = np.flatnonzero(pos == 0)
            assert ids[0] == BOS_ID and len(starts) >= len(members)
            for k, i in enumerate(members):  # each sentence as written, cut to the window
                tokens = shards.shard(s).sentence(int(i))
                a = starts[k]
                n = min(len(tokens) + 2, L)
                assert ids[a] == BOS_ID and np.array_equal(ids[a + 1 : a + min(n, len(tokens) + 1)], tokens[: n - 1])
        assert sorted(seen) == sorted(sentences.values())
    assert [w.bin_sentences(0, p)[1].tolist() for p in range(5)] != [w.bin_sentences(1, p)[1].tolist() for p in range(5)]


def test_sentence_mode_logits_equal_alone(tmp_path):
    """Packed sentences with restarting position_ids attend only within themselves."""
    shards, _ = write_source(tmp_path, [[1, 1, 2]])
    w = SourceWindows(shards, seq_len=1100, mode="sentence", seed=0)  # 258 + 258 + 514 tokens fit in one window
    assert w.per_epoch == 1
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


@pytest.fixture()
def three_sources(tmp_path):
    out = []
    for k, n in enumerate((30, 20, 12)):
        (tmp_path / f"s{k}").mkdir()
        shards, _ = write_source(tmp_path / f"s{k}", [[1] * n, [2] * (n // 2)], seed=k, kind="image")
        out.append(SourceWindows(shards, 256, "concat", 0, stream=k))
    return out


def test_mixture_shares_track_the_weights_at_every_step(three_sources):
    weights = [0.6, 0.3, 0.1]
    m = MixtureWindows(three_sources, ["a", "b", "c"], weights)
    drawn = np.zeros(3)
    seen = [set() for _ in range(3)]
    for g in range(2000):
        s, i = m.schedule.at(g)
        assert i not in seen[s]  # each source's own stream, in order, nothing twice
        seen[s].add(i)
        drawn[s] += 1
        if g + 1 >= 200:
            assert np.abs(drawn / (g + 1) - weights).max() <= 0.02, (g, drawn)
        assert np.array_equal(m.schedule.drawn(g + 1), drawn)
    assert all(seen[s] == set(range(len(seen[s]))) for s in range(3))
    ids, _, _, s = m.window(7)
    assert np.array_equal(ids, three_sources[s].window(m.schedule.at(7)[1])[0])
    default = MixtureWindows(three_sources, ["a", "b", "c"])  # proportional to tokens
    tokens = np.array([float((x.shards.tokens + 2 * x.shards.sentences).sum()) for x in three_sources])
    assert np.allclose(default.weights, tokens / tokens.sum())


def test_ranks_read_disjoint_windows_and_resume_exactly(three_sources):
    m = MixtureWindows(three_sources, ["a", "b", "c"], [0.5, 0.3, 0.2])
    ranks = [DistributedLoader(m, 2, r, 2) for r in range(2)]
    read = [[], []]
    for _ in range(25):
        for r, loader in enumerate(ranks):
            read[r] += loader.indices()
            batch = loader.next_batch()
            assert torch.equal(batch.input_ids[0], torch.from_numpy(m.window(read[r][-2])[0]))
            assert batch.sources.tolist() == [m.schedule.at(g)[0] for g in read[r][-2:]]
    assert not set(read[0]) & set(read[1]) and sorted(read[0] + read[1]) == list(range(100))
    assert ranks[0].tokens_by_source() == {n: int(c) * 256 for n, c in zip("abc", m.schedule.drawn(100), strict=True)}

    ref = DistributedLoader(m, 2, 1, 2)
    for _ in range(5):
        ref.next_batch()
    expected = ref.next_batch()
    fresh = DistributedLoader(m, 2, 1, 2)
    fresh.load_state_dict({**ranks[0].state_dict(), "windows_consumed": 20})
    got = fresh.next_batch()
    assert torch.equal(got.input_ids, expected.input_ids) and torch.equal(got.sources, expected.sources)

    other = DistributedLoader(MixtureWindows(three_sources, ["a", "b", "c"], [0.2, 0.3, 0.5]), 2, 0, 2)
    with pytest.raises(ValueError, match="schedule"):
        other.load_state_dict(ranks[0].state_dict())
    with pytest.raises(ValueError, match="older loader"):
        other.load_state_dict({"windows_consumed": 4, "seq_len": 256, "mode": "concat", "seed": 0, "n_sentences": 3})


def test_prefetching_changes_nothing_but_the_waiting(three_sources):
    m = MixtureWindows(three_sources, ["a", "b", "c"], [0.5, 0.3, 0.2])
    plain, ahead = DistributedLoader(m, 3, 1, 2), DistributedLoader(m, 3, 1, 2, prefetch=3)
    for k in range(12):
        if k == 6:  # a resume in the middle: what was fetched ahead is dropped
            for loader in (plain, ahead):
                loader.load_state_dict({**loader.state_dict(), "windows_consumed": 66})
        a, b = plain.next_batch(), ahead.next_batch()
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.sources, b.sources)
        assert plain.windows_consumed == ahead.windows_consumed
    ahead.close()
