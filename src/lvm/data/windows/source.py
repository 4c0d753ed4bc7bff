"""Visual sentences of one source -> fixed-length training windows, deterministic and directly addressable.

Every sentence becomes `[BOS] tokens [EOS]`. A window is `seq_len` input positions and, for each,
its target: the token that follows it (`targets[t]` is predicted from positions <= t; already shifted,
so the loss does no shift of its own, see `lvm.data.windows.batch.Batch.model_inputs`), or IGNORE_INDEX
where nothing is to be predicted. Two ways to fill the windows:

- `concat` (default, as LVM/EasyLM): per epoch, the sentences in a seeded shuffled order are
  concatenated into one stream that is cut into windows; the remainder of an epoch is dropped. Window p
  reads stream tokens [p L, p L + L + 1) (as Megatron / GPT-NeoX / TinyLlama): the first L are its inputs,
  the last L its targets, so consecutive windows overlap by one token, every position is trained and the
  first token of a window is the target of the previous window's last position. The stride stays L:
  the inputs of the epoch's windows are the stream cut into L-token pieces, nothing skipped. The epoch's
  last window may end exactly at the stream's end (when the epoch's tokens are a multiple of L); its last
  target is then BOS, the first token of any stream (every sentence, hence every epoch, begins with it):
  what follows the stream's final EOS in the concatenation of epochs.
- `sentence`: whole sentences are packed best-fit-decreasing into windows and never split (a sentence
  longer than a window is truncated to it); the rest is PAD, which is never a target. `position_ids`
  restart at 0 for every sentence, so attention never crosses sentences, and targets never cross them
  either: a sentence's last position (EOS) has none, and the first token of each sentence is no target.
  A sentence truncated to the window keeps the target of its last position (its token L + 1), so it
  trains L targets, as the evaluation (`lvm.eval.perplexity`) scores it. Packing works per shard, from
  the shard's counts of sentences per length (recorded when it was written), so the number of windows
  of every shard is known before any shard is read. A window never mixes shards: a shard's partly
  filled windows are not topped up from other shards (negligible for shards of thousands of
  sentences; a folder of one-sentence shards would get a window per sentence).

The shuffle and what it mixes. Its state is O(number of shards); window w of epoch e is computed
directly (no pass over earlier windows), so a resumed run is exact and resuming costs nothing:

1. Shards: a seeded permutation of the source's shards per epoch. In `concat` mode the epoch stream is
   the shards in that order; in `sentence` mode the epoch's windows are the shards' windows in that order.
2. Sentences inside a shard: in `concat` mode each block of `BLOCK_SENTENCES` consecutive sentences of a
   shard is permuted (seeded by epoch, shard and block); in `sentence` mode all sentences of a shard are
   permuted before they are assigned to bins (seeded by epoch and shard). So a window holds sentences
   drawn at random from one block (`concat`: ~8k sentences, the size of a make_shards shard) or one
   shard (`sentence`), never a run of neighbours as they were written.
3. Read order: the epoch's windows are cut into chunks spanning about `CHUNK_SHARDS` = 16 shards
   (`sentence` mode with very large shards: fewer, at most `LAYOUT_SENTENCES` sentences in all), and each
   chunk is read in a keyed pseudo-random order (a Feistel permutation). Consecutive windows, hence the
   windows of one global batch, come from different shards of the chunk, at random places in them: with
   shards of equal size, two consecutive windows share a shard with probability ~1/16, and a batch of
   32 windows draws from ~14 different shards (16 (1 - (15/16)^32)). Without this order they would
   share it ~always (a make_shards shard of 8k single images fills ~500 windows of 4096).

What it does not do: a global shuffle. Two sentences in different chunks of an epoch (far apart in
the epoch's shard order) are never in the same batch of that epoch; the shard permutation changes
per epoch, so chunks are regrouped every epoch. Each chunk keeps its shards' layouts in a bounded
cache, so per-rank memory is O(shards) + O(chunk's shards' layouts) whatever the corpus size.
"""


from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from lvm.data.shards.format import ShardError
from lvm.data.shards.shard_set import ShardSet, read_in_threads
from lvm.data.windows.binpack import bin_types, n_bins
from lvm.data.windows.order import feistel, mix64, seeded_rng
from lvm.model.vocab import BOS_ID, IGNORE_INDEX, PAD_ID, frame

PACKING_MODES = ("concat", "sentence")
BLOCK_SENTENCES = 8192        # concat: sentences shuffled together inside a shard
CHUNK_SHARDS = 16             # read order is random inside chunks of the epoch spanning about this many shards
LAYOUT_SENTENCES = 1 << 22    # sentence mode: a chunk spans at most this many sentences (bounds the layouts held)


class _LRU(OrderedDict):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def get_or(self, key, make):
        v = self.get(key)
        if v is None:
            v = make()
            self[key] = v
            while len(self) > self.capacity:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return v


class SourceWindows:
    """Windows of one source (a folder of shards): window i is window i mod W of epoch i div W."""

    def __init__(self, shards: ShardSet, seq_len: int, mode: str = "concat", seed: int = 0, stream: int = 0):
        if mode not in PACKING_MODES:
            raise ValueError(f"--packing must be one of {PACKING_MODES}, got {mode!r}")
        if len(shards) == 0:
            raise ValueError(f"{shards.folder}: no sentences to train on")
        self.shards, self.seq_len, self.mode, self.seed, self.stream = shards, seq_len, mode, seed, stream
        S = shards.n_shards
        if mode == "concat":
            self.unit = shards.tokens + 2 * shards.sentences  # stream tokens per shard
            total = int(self.unit.sum())
            self.per_epoch = total // seq_len
            if self.per_epoch == 0:
                raise ValueError(f"{shards.folder}: the data holds {total} tokens, fewer than one window of {seq_len}")
            span = CHUNK_SHARDS
        else:
            counts = read_in_threads(self._stream_counts, list(range(S)))  # index entries or shard headers
            self.unit = np.array([n_bins(tuple(sorted(c.items())), seq_len) for c in counts], np.int64)
            self.per_epoch = int(self.unit.sum())
            # input tokens (not PAD) of each shard's windows: every sentence once, truncated to the window
            self.shard_tokens = np.array([sum(min(n, seq_len) * c for n, c in x.items()) for x in counts], np.int64)
            span = max(1, LAYOUT_SENTENCES // max(1, int(shards.sentences.max())))
        self.span = max(1, min(span, CHUNK_SHARDS, S))
        self.chunk = max(1, math.ceil(self.per_epoch * self.span / S))
        shards.capacity = max(shards.capacity, 2 * self.span + 2)
        self._epochs = _LRU(3)
        self._layouts = _LRU(2 * self.span + 2 if mode == "sentence" else 8 * self.span + 8)
        self._bin_tokens = _LRU(2 * self.span + 2)  # sentence mode: shard -> input tokens of its bins, by bin type
        self._chunk_head = (-1, -1, 0, 0)  # (epoch, chunk, windows read, their input tokens): the chunk being read

    # --- the order -------------------------------------------------------------------------------
    def _stream_counts(self, j: int) -> dict[int, int]:
        """{tokens with BOS/EOS: sentences} of shard j."""
        return {length + 2: c for length, c in self.shards.length_counts(j).items()}

    def epoch_layout(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard permutation, cumulative stream tokens (concat) or windows (sentence) in that order)."""
        def make():
            perm = seeded_rng(self.seed, self.stream, e).permutation(self.shards.n_shards)
            cum = np.zeros(len(perm) + 1, np.int64)
            np.cumsum(self.unit[perm], out=cum[1:])
            return perm, cum
        return self._epochs.get_or(e, make)

    def read_position(self, e: int, w: int) -> int:
        """Which window of epoch e's packed stream is the w-th read (a permutation inside each chunk)."""
        c, q = divmod(w, self.chunk)
        size = min(self.chunk, self.per_epoch - c * self.chunk)
        return c * self.chunk + feistel(q, size, mix64(self.seed, self.stream, e, c))

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(input_ids, targets, position_ids or None) of the source's window i (targets: see the module doc)."""
        e, w = divmod(i, self.per_epoch)
        return self.window_at(e, self.read_position(e, w))

    def window_at(self, e: int, p: int):
        return self._concat_window(e, p) if self.mode == "concat" else self._sentence_window(e, p)

    # --- concat ----------------------------------------------------------------------------------
    def _block_starts(self, shard) -> np.ndarray:
        starts = shard.cache.get("block_starts")
        if starts is None:
            first = np.arange(0, len(shard), BLOCK_SENTENCES, dtype=np.int64)
            starts = shard.offsets[first].astype(np.int64) - int(shard.offsets[0]) + 2 * first
            shard.cache["block_starts"] = starts
        return starts

    def _block(self, e: int, s: int, b: int, shard) -> tuple[np.ndarray, np.ndarray]:
        def make():
            lo = b * BLOCK_SENTENCES
            hi = min(lo + BLOCK_SENTENCES, len(shard))
            perm = seeded_rng(self.seed, self.stream, e, s, b).permutation(hi - lo)
            lens = np.diff(shard.offsets[lo : hi + 1].astype(np.int64))[perm] + 2
            return perm + lo, np.cumsum(lens)
        return self._layouts.get_or((e, s, b), make)

    def _concat_window(self, e: int, p: int):
        """Stream tokens [p L, p L + L + 1) of epoch e: L inputs and the L targets after them."""
        L = self.seq_len
        n = L + 1
        perm, cum = self.epoch_layout(e)
        end = min(p * L + n, int(cum[-1]))  # the epoch's stream ends at cum[-1] >= per_epoch * L
        pieces = []  # (shard, a0, a1, begin, take): tokens [begin, begin+take) of [BOS] values[a0:a1] [EOS]
        pos = p * L
        while pos < end:
            j = int(np.searchsorted(cum, pos, side="right")) - 1
            s = int(perm[j])
            shard = self.shards.shard(s)
            o = pos - int(cum[j])
            starts = self._block_starts(shard)
            b = int(np.searchsorted(starts, o, side="right")) - 1
            order, ends = self._block(e, s, b, shard)
            ob = o - int(starts[b])
            k = int(np.searchsorted(ends, ob, side="right"))
            while pos < end and k < len(order):
                i = int(order[k])
                a0, a1 = int(shard.offsets[i]), int(shard.offsets[i + 1])
                m = a1 - a0 + 2
                begin = ob - (int(ends[k]) - m)
                take = min(m - begin, end - pos)
                pieces.append((shard, a0, a1, begin, take))
                pos, ob, k = pos + take, ob + take, k + 1
        for shard, a0, a1, _, _ in pieces:  # the pieces are read from storage in parallel, not one by one
            shard.willneed(a0, a1)
        out = np.empty(n, np.int64)
        at = 0
        for shard, a0, a1, begin, take in pieces:
            _fill(out, at, shard, a0, a1, begin, take)
            at += take
        if at < n:  # the stream ended with this window's inputs: what follows its last EOS is a BOS
            out[at:] = BOS_ID
        return out[:L], out[1:].copy(), None

    # --- sentence --------------------------------------------------------------------------------
    def _types(self, s: int, shard):
        t = shard.cache.get(("types", self.seq_len))
        if t is None:
            lens, comps, mult = bin_types(self._stream_counts(s), self.seq_len)
            comps = np.array(comps, np.int64).reshape(len(mult), len(lens))
            mult = np.array(mult, np.int64)
            cum_mult = np.concatenate([[0], np.cumsum(mult)])
            base = np.concatenate([np.zeros((1, len(lens)), np.int64), np.cumsum(comps * mult[:, None], 0)])[:-1]
            t = (np.array(lens, np.int64), comps, cum_mult, base)
            shard.cache[("types", self.seq_len)] = t
        return t

    def _shard_layout(self, e: int, s: int, shard, lens: np.ndarray):
        def make():
            cl = np.minimum(shard.lengths() + 2, self.seq_len)
            asc = lens[::-1]
            at = np.searchsorted(asc, cl)
            ok = at < len(asc)
            if not ok.all() or not np.array_equal(asc[at], cl):
                raise ShardError(f"shard {shard.path}: sentence lengths do not match its recorded length counts")
            cls = (len(asc) - 1 - at).astype(np.int16)
            perm = seeded_rng(self.seed, self.stream, e, s).permutation(len(cl))
            members = perm[np.argsort(cls[perm], kind="stable")].astype(np.int32)
            start = np.zeros(len(asc) + 1, np.int64)
            np.cumsum(np.bincount(cls, minlength=len(asc)), out=start[1:])
            return members, start
        return self._layouts.get_or((e, s), make)

    def bin_sentences(self, e: int, p: int) -> tuple[int, np.ndarray]:
        """(shard, its sentence indices) packed into window p of epoch e (sentence mode)."""
        perm, cum = self.epoch_layout(e)
        j = int(np.searchsorted(cum, p, side="right")) - 1
        s = int(perm[j])
        k = p - int(cum[j])
        shard = self.shards.shard(s)
        lens, comps, cum_mult, base = self._types(s, shard)
        members, start = self._shard_layout(e, s, shard, lens)
        t = int(np.searchsorted(cum_mult, k, side="right")) - 1
        r = k - int(cum_mult[t])
        parts = [members[start[c] + base[t, c] + r * a : start[c] + base[t, c] + (r + 1) * a]
                 for c, a in enumerate(comps[t].tolist()) if a]
        return s, np.concatenate(parts)

    def _sentence_window(self, e: int, p: int):
        L = self.seq_len
        s, members = self.bin_sentences(e, p)
        shard = self.shards.shard(s)
        ids = np.full(L + 1, PAD_ID, np.int64)  # one more: the target of a truncated sentence's last position
        targets = np.full(L, IGNORE_INDEX, np.int64)
        pos_ids = np.zeros(L, np.int64)
        members = members.tolist()
        for i in members:  # read from storage in parallel, not one by one
            shard.willneed(int(shard.offsets[i]), int(shard.offsets[i + 1]))
        at = 0
        for i in members:
            a0, a1 = int(shard.offsets[i]), int(shard.offsets[i + 1])
            n = min(a1 - a0 + 2, L)  # positions it takes
            _fill(ids, at, shard, a0, a1, 0, min(a1 - a0 + 2, L + 1))  # a truncated one (alone): L + 1 tokens
            last = n if a1 - a0 + 2 > L else n - 1  # positions with a target inside the sentence
            targets[at : at + last] = ids[at + 1 : at + 1 + last]
            pos_ids[at : at + n] = np.arange(n)
            at += n
        pos_ids[at:] = np.arange(L - at)
        return ids[:L].copy(), targets, pos_ids

    # --- input tokens of the windows read so far (tokens_by_source) --------------------------------------------------
    def input_tokens(self, n: int) -> int:
        """Input positions that are not PAD in the source's windows 0 .. n-1: seq_len per concat window (a concat
        window has no PAD); for sentence windows the tokens of their sentences, computed from the shards' length
        counts without reading a token: whole epochs and whole read-order chunks in closed form, then the windows
        read so far of the current chunk (remembered, so a growing n costs only its new windows)."""
        if self.mode == "concat":
            return n * self.seq_len
        e, w = divmod(n, self.per_epoch)
        total = e * int(self.shard_tokens.sum())
        c, q = divmod(w, self.chunk)
        total += self._prefix_tokens(e, c * self.chunk)
        if q:
            he, hc, hq, ht = self._chunk_head
            if (he, hc) != (e, c) or hq > q:
                hq, ht = 0, 0
            for k in range(hq, q):
                ht += self._window_tokens(e, self.read_position(e, c * self.chunk + k))
            self._chunk_head = (e, c, q, ht)
            total += ht
        return total

    def _bins_of(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shard s: (first window of each bin type, input tokens of the windows before it, tokens of one such bin)."""
        def make():
            lens, comps, mult = bin_types(self._stream_counts(s), self.seq_len)
            per_bin = np.array(comps, np.int64).reshape(len(mult), len(lens)) @ np.array(lens, np.int64)
            mult = np.array(mult, np.int64)
            first = np.concatenate([[0], np.cumsum(mult)])
            before = np.concatenate([[0], np.cumsum(mult * per_bin)])
            return first, before, per_bin
        return self._bin_tokens.get_or(s, make)

    def _window_tokens(self, e: int, p: int) -> int:
        """Input tokens of window p of epoch e's packed order (sentence mode)."""
        perm, cum = self.epoch_layout(e)
        j = int(np.searchsorted(cum, p, side="right")) - 1
        first, _, per_bin = self._bins_of(int(perm[j]))
        return int(per_bin[int(np.searchsorted(first, p - int(cum[j]), side="right")) - 1])

    def _prefix_tokens(self, e: int, p: int) -> int:
        """Input tokens of windows 0 .. p-1 of epoch e's packed order (sentence mode): whole shards, then bins."""
        if p <= 0:
            return 0
        perm, cum = self.epoch_layout(e)
        j = int(np.searchsorted(cum, p, side="right")) - 1
        total = int(self.shard_tokens[perm[:j]].sum())
        k = p - int(cum[j])
        if k and j < len(perm):
            first, before, per_bin = self._bins_of(int(perm[j]))
            t = int(np.searchsorted(first, k, side="right")) - 1
            total += int(before[t]) + (k - int(first[t])) * int(per_bin[t])
        return total

    def identity(self) -> dict:
        sh = self.shards
        return {"shards": sh.n_shards, "sentences": len(sh), "tokens": int(sh.tokens.sum()), "windows_per_epoch": self.per_epoch}


def _fill(out: np.ndarray, at: int, shard, a0: int, a1: int, begin: int, take: int) -> None:
    """out[at:at+take] = tokens [begin, begin+take) of the sentence stream [BOS] values[a0:a1] [EOS]."""
    frame(lambda lo, hi: shard.read(a0 + lo, a0 + hi), begin, begin + take, n=a1 - a0, out=out[at : at + take])
