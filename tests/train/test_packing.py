"""Windows of one source: every sentence once per epoch, directly addressable, shuffled across shards."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from lvm.data.mixture import DistributedLoader, MixtureWindows
from lvm.data.shards.format import write_shard
from lvm.data.shards.shard_set import open_shards
from lvm.data.windows.batch import Batch, causal_lm_loss
from lvm.data.windows.binpack import best_fit, bin_types
from lvm.data.windows.order import feistel
from lvm.data.windows.source import SourceWindows
from lvm.eval.perplexity import sentence_ids, token_losses
from lvm.model.attention import packed_attention_kwargs
from lvm.model.presets import llama_config
from lvm.model.vocab import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID
from lvm.train.metrics import window_nll


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


def next_in_stream(stream, sentences):
    """The token after a concat stream whose sentences are known: BOS after an EOS, else the next one
    of the sentence the stream ends inside (found by its prefix)."""
    if stream[-1] == EOS_ID:
        return BOS_ID
    head = stream[np.flatnonzero(stream == BOS_ID)[-1] + 1 :].astype(np.uint16)
    hits = [np.frombuffer(b, np.uint16) for b in sentences if np.frombuffer(b, np.uint16)[: len(head)].tobytes() == head.tobytes()]
    assert len(hits) == 1
    return int(hits[0][len(head)]) if len(head) < len(hits[0]) else EOS_ID


def test_concat_window_trains_every_position(tmp_path):
    """A concat window has seq_len targets: the next token of every position, the last one's being the
    first input of the next window of the stream (the stride stays seq_len: the inputs tile the stream)."""
    rng = np.random.default_rng(3)
    shards, sentences = write_source(tmp_path, [rng.integers(1, 4, rng.integers(3, 9)).tolist() for _ in range(5)])
    L = 300
    w = SourceWindows(shards, seq_len=L, mode="concat", seed=2)
    assert w.per_epoch == (int(shards.tokens.sum()) + 2 * len(shards)) // L  # unchanged: nothing skipped
    for e in (0, 1):
        windows = [w.window_at(e, p) for p in range(w.per_epoch)]
        for p, (ids, targets, pos) in enumerate(windows):
            assert pos is None and len(ids) == len(targets) == L
            assert (targets != IGNORE_INDEX).sum() == L
            assert np.array_equal(targets[:-1], ids[1:])
            if p + 1 < w.per_epoch:
                assert targets[-1] == windows[p + 1][0][0]
        stream = np.concatenate([x[0] for x in windows])
        assert windows[-1][1][-1] == next_in_stream(stream, sentences)  # read from the epoch's dropped remainder
    i = 7  # window i of the source is window read_position(e, i) of its epoch, targets included
    e, r = divmod(i, w.per_epoch)
    for a, b in zip(w.window(i), w.window_at(e, w.read_position(e, r)), strict=True):
        assert a is None and b is None or np.array_equal(a, b)


def test_concat_stream_ending_with_the_last_window_gives_bos(tmp_path):
    """Epoch tokens a multiple of seq_len: the last window's last target is the BOS that starts every stream."""
    shards, _ = write_source(tmp_path, [[1] * 4, [1] * 2])
    w = SourceWindows(shards, seq_len=2 * 258, mode="concat", seed=0)
    assert w.per_epoch == 3
    for p in range(3):
        ids, targets, _ = w.window_at(0, p)
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID and targets[-1] == BOS_ID and (targets != IGNORE_INDEX).sum() == 516


def tiny_model(seq_len):
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(llama_config("tiny", seq_len), attn_implementation="sdpa").eval()


def test_model_loss_is_the_mean_over_all_seq_len_targets(tmp_path):
    """The loss the trainer backpropagates (the model's, from Batch.model_inputs) and the per-window NLL of
    mixtures are cross-entropy over all seq_len positions of each concat window, the last one included."""
    rng = np.random.default_rng(5)
    shards, _ = write_source(tmp_path, [rng.integers(1, 4, 6).tolist() for _ in range(3)])
    L = 200
    w = SourceWindows(shards, seq_len=L, mode="concat", seed=1)
    batch = DistributedLoader(w, 3).next_batch()
    want = []  # each window's inputs shifted by one, then the first input of the next window of the stream
    for g in range(3):
        p = w.read_position(0, g)
        assert p + 1 < w.per_epoch
        want.append(np.concatenate([w.window_at(0, p)[0][1:], w.window_at(0, p + 1)[0][:1]]))
    want = torch.from_numpy(np.stack(want))
    assert torch.equal(batch.targets, want)
    inputs = batch.model_inputs()
    # the targets go in once, as shift_labels (used as given); no `labels` for the model to shift
    assert sorted(inputs) == ["input_ids", "shift_labels"] and torch.equal(inputs["shift_labels"], want)
    model = tiny_model(L)
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
        loss = causal_lm_loss(model, out, inputs["shift_labels"])
    assert out.loss is None  # transformers' LlamaForCausalLM computes a loss only when given labels
    logits = out.logits.float()
    vocab = logits.shape[-1]
    nll = F.cross_entropy(logits.reshape(-1, vocab), want.reshape(-1), reduction="none").reshape(3, L)
    assert torch.allclose(loss, nll.mean(), atol=1e-6, rtol=1e-6)
    # the last position counts: without it (seq_len - 1 targets) the mean differs
    assert abs(nll.mean() - nll[:, :-1].mean()) > 1e-5 and abs(loss - nll[:, :-1].mean()) > 1e-6
    sums, counts = window_nll(logits, inputs["shift_labels"])
    assert counts.tolist() == [L] * 3 and torch.allclose(sums, nll.sum(1).double(), rtol=1e-6)


def test_sentence_window_loss_equals_evaluation_of_its_sentences(tmp_path):
    """Sentence packing: the loss of a packed window is the NLL evaluation gives its sentences alone (no target
    across a sentence boundary; a truncated sentence trains the seq_len targets evaluation scores)."""
    shards, _ = write_source(tmp_path, [[1, 2, 5]])  # 258, 514 and 1282 tokens: the last one is truncated
    L = 1100
    w = SourceWindows(shards, seq_len=L, mode="sentence", seed=0)
    assert w.per_epoch == 2
    model = tiny_model(L)
    for p in range(2):
        ids, targets, pos = w.window_at(0, p)
        inputs = Batch(*(torch.from_numpy(x)[None] for x in (ids, targets, pos))).model_inputs()
        assert "labels" not in inputs
        with torch.no_grad():
            out = model(**inputs, **packed_attention_kwargs(inputs["position_ids"], "sdpa", torch.float32), use_cache=False)
            loss = float(causal_lm_loss(model, out, inputs["shift_labels"]))
        _, members = w.bin_sentences(0, p)
        alone = [token_losses(model, [sentence_ids(shards, int(i), L)], "cpu")[0] for i in members]
        n = sum(len(x) for x in alone)
        assert (targets != IGNORE_INDEX).sum() == n == (L if p == 0 else 257 + 513)
        assert abs(loss - sum(float(x.sum()) for x in alone) / n) < 1e-4
        sums, counts = window_nll(out.logits, inputs["shift_labels"])
        assert counts.item() == n and abs(sums.item() / n - loss) < 1e-5


def test_a_loss_the_model_computes_from_shift_labels_is_kept():
    """A forward that computes the loss itself from shift_labels alone (Liger's, whose fused linear cross-entropy
    never materialises the logits) is trusted as is; the plain model's logits are scored otherwise."""
    from types import SimpleNamespace

    own = torch.tensor(1.25)
    assert causal_lm_loss(None, SimpleNamespace(loss=own, logits=None), torch.zeros(1, 4, dtype=torch.long)) is own


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
            ids, targets, pos = w.window_at(e, p)
            s, members = w.bin_sentences(e, p)
            seen += [(s, int(i)) for i in members]
            assert len(ids) == len(targets) == len(pos) == L
            assert (targets[ids == PAD_ID] == IGNORE_INDEX).all() and not (targets == BOS_ID).any()
            starts = np.flatnonzero(pos == 0)
            assert ids[0] == BOS_ID and len(starts) >= len(members)
            want = np.full(L, IGNORE_INDEX)
            for k, i in enumerate(members):  # each sentence as written, cut to the window
                tokens = shards.shard(s).sentence(int(i))
                full = np.concatenate([[BOS_ID], tokens, [EOS_ID]])
                a = starts[k]
                n = min(len(full), L)
                assert np.array_equal(ids[a : a + n], full[:n])
                # targets: the next token inside the sentence; a truncated sentence keeps its last one (token L + 1)
                n_targets = L if len(full) > L else n - 1
                want[a : a + n_targets] = full[1 : 1 + n_targets]
            assert np.array_equal(targets, want)
        assert sorted(seen) == sorted(sentences.values())
    assert [w.bin_sentences(0, p)[1].tolist() for p in range(5)] != [w.bin_sentences(1, p)[1].tolist() for p in range(5)]


def test_sentence_mode_logits_equal_alone(tmp_path):
    """Packed sentences with restarting position_ids attend only within themselves."""
    shards, _ = write_source(tmp_path, [[1, 1, 2]])
    w = SourceWindows(shards, seq_len=1100, mode="sentence", seed=0)  # 258 + 258 + 514 tokens fit in one window
    assert w.per_epoch == 1
    ids, targets, pos = w.window(0)
    assert (targets[ids == PAD_ID] == IGNORE_INDEX).all() and not (targets == BOS_ID).any()
    assert (targets[ids == EOS_ID] == IGNORE_INDEX).all()  # nothing is predicted across a sentence boundary
    assert (targets != IGNORE_INDEX).sum() == 257 + 257 + 513
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
            assert torch.equal(batch.targets[0], torch.from_numpy(m.window(read[r][-2])[1]))
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
    assert torch.equal(got.targets, expected.targets)

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


def test_tokens_by_source_count_no_pad(tmp_path):
    """tokens_by_source: the input tokens of the windows drawn so far from each source by all ranks, PAD left out.
    Sentence-packed windows end in PAD; the count equals the non-PAD positions of exactly those windows, over epoch
    ends and read-order chunks (40 shards: chunks of 16), after a resume too; a concat window has no PAD."""
    rng = np.random.default_rng(7)
    srcs = []
    for k, n_shards in enumerate((40, 3)):
        (tmp_path / f"s{k}").mkdir()
        shards, _ = write_source(tmp_path / f"s{k}", [rng.integers(1, 6, rng.integers(1, 6)).tolist() for _ in range(n_shards)],
                                 seed=k)
        srcs.append(SourceWindows(shards, 800, "sentence", 0, stream=k))
    assert srcs[0].chunk < srcs[0].per_epoch  # several read-order chunks per epoch
    m = MixtureWindows(srcs, ["a", "b"], [0.7, 0.3])
    steps = (2 * srcs[0].per_epoch + 7) // 4
    drawn_at_end = m.schedule.drawn(4 * steps)
    pad = [np.array([int((src.window(i)[0] != PAD_ID).sum()) for i in range(int(d))]) for src, d in zip(srcs, drawn_at_end,
                                                                                                          strict=True)]
    assert all((p < 800).any() for p in pad) and drawn_at_end[1] > 2 * srcs[1].per_epoch  # PAD to leave out; epochs
    ranks = [DistributedLoader(m, 2, r, 2) for r in range(2)]
    for step in range(steps):
        for loader in ranks:
            loader.next_batch()
        drawn = ranks[0].windows_by_source()
        want = {name: int(pad[s][: int(drawn[s])].sum()) for s, name in enumerate("ab")}
        assert ranks[0].tokens_by_source() == ranks[1].tokens_by_source() == want, step
        if step % 9 == 4:  # a fresh loader resumed here counts the same
            again = DistributedLoader(m, 2, 0, 2)
            again.load_state_dict(ranks[0].state_dict())
            assert again.tokens_by_source() == want
    concat = DistributedLoader(SourceWindows(srcs[1].shards, 300, "concat", 0), 3)
    for _ in range(5):
        concat.next_batch()
    assert concat.tokens_by_source() == {"source0": 15 * 300}
