"""Visual sentences -> fixed-length training windows, deterministic and resumable.

Every sentence becomes `[BOS] tokens [EOS]`. Two ways to fill `seq_len`-token windows:

- `concat` (default, as LVM/EasyLM): per epoch, sentences in a seeded shuffled order are
  concatenated into one stream that is cut into windows; the remainder of an epoch is dropped.
- `sentence`: per epoch, whole sentences are packed best-fit into windows and never split
  (a sentence longer than a window is truncated to it); the rest is PAD, which is never a target.
  `position_ids` restart at 0 for every sentence, so attention never crosses sentences, and the
  first token of each sentence is not a target (it would be predicted from the previous one).

The stream of windows is global: window g of the run is window g mod W of epoch g div W. A
micro-step consumes `world_size * micro_batch` consecutive windows, rank r taking its slice. The
loader's only state is `windows_consumed`, so a resumed run sees exactly the windows the
uninterrupted one would have seen next, for any world size with the same global batch.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from lvm.data.shards import SentenceTable
from lvm.model.vocab import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID

PACKING_MODES = ("concat", "sentence")


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def best_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing of sentences (ids from `order`) into windows."""
    by_len = sorted(order.tolist(), key=lambda i: -min(int(lengths[i]), capacity))  # stable: ties keep order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining, bin index)
    for i in by_len:
        need = min(int(lengths[i]), capacity)
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            if room - need > 0:
                bisect.insort(free, (room - need, b))
        else:
            bins.append([i])
            if capacity - need > 0:
                bisect.insort(free, (capacity - need, len(bins) - 1))
    return bins


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None

    def model_inputs(self) -> dict:
        d = {"input_ids": self.input_ids, "labels": self.labels}
        if self.position_ids is not None:
            d["position_ids"] = self.position_ids
        return d


class PackedWindows:
    """Window g of the global stream, for either packing mode."""

    def __init__(self, table: SentenceTable, seq_len: int, mode: str = "concat", seed: int = 0):
        if mode not in PACKING_MODES:
            raise ValueError(f"--packing must be one of {PACKING_MODES}, got {mode!r}")
        if len(table) == 0:
            raise ValueError("no sentences to train on")
        self.table, self.seq_len, self.mode, self.seed = table, seq_len, mode, seed
        self.lengths = table.lengths() + 2  # BOS + EOS
        total = int(self.lengths.sum())
        if mode == "concat":
            self.per_epoch = total // seq_len
            if self.per_epoch == 0:
                raise ValueError(f"the data holds {total} tokens, fewer than one window of {seq_len}")
        else:
            self.per_epoch = len(self._bins(0))
        self._cache: tuple[int, object] | None = None

    def _bins(self, epoch: int) -> list[list[int]]:
        bins = best_fit(self.lengths, epoch_order(len(self.table), self.seed, epoch), self.seq_len)
        perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(bins))
        return [bins[k] for k in perm]

    def _epoch(self, epoch: int):
        if self._cache is None or self._cache[0] != epoch:
            if self.mode == "concat":
                order = epoch_order(len(self.table), self.seed, epoch)
                ends = np.cumsum(self.lengths[order])
                self._cache = (epoch, (order, ends))
            else:
                self._cache = (epoch, self._bins(epoch))
        return self._cache[1]

    def _sentence_tokens(self, i: int) -> np.ndarray:
        out = np.empty(self.lengths[i], np.int64)
        out[0], out[-1] = BOS_ID, EOS_ID
        out[1:-1] = self.table.sentence(i)
        return out

    def window(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(input_ids, labels, position_ids or None) of global window g."""
        epoch, w = divmod(g, self.per_epoch)
        data = self._epoch(epoch)
        if self.mode == "concat":
            order, ends = data
            start, stop = w * self.seq_len, (w + 1) * self.seq_len
            k = int(np.searchsorted(ends, start, side="right"))
            pieces, pos = [], start
            while pos < stop:
                i = order[k]
                s0 = ends[k] - self.lengths[i]
                toks = self._sentence_tokens(i)
                take = toks[pos - s0 : min(stop, ends[k]) - s0]
                pieces.append(take)
                pos += len(take)
                k += 1
            ids = np.concatenate(pieces)
            return ids, ids.copy(), None
        ids = np.full(self.seq_len, PAD_ID, np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, np.int64)
        pos_ids = np.zeros(self.seq_len, np.int64)
        at = 0
        for i in data[w]:
            toks = self._sentence_tokens(i)[: self.seq_len]
            n = len(toks)
            ids[at : at + n] = toks
            labels[at + 1 : at + n] = toks[1:]
            pos_ids[at : at + n] = np.arange(n)
            at += n
        pos_ids[at:] = np.arange(self.seq_len - at)
        return ids, labels, pos_ids


class DistributedLoader:
    """Micro-batches of windows for one data-parallel rank; state = windows consumed globally."""

    def __init__(self, windows: PackedWindows, micro_batch: int, rank: int = 0, world_size: int = 1):
        self.windows, self.micro_batch, self.rank, self.world_size = windows, micro_batch, rank, world_size
        self.windows_consumed = 0

    def next_batch(self) -> Batch:
        first = self.windows_consumed + self.rank * self.micro_batch
        parts = [self.windows.window(first + j) for j in range(self.micro_batch)]
        self.windows_consumed += self.world_size * self.micro_batch
        ids = torch.from_numpy(np.stack([p[0] for p in parts]))
        labels = torch.from_numpy(np.stack([p[1] for p in parts]))
        pos = torch.from_numpy(np.stack([p[2] for p in parts])) if parts[0][2] is not None else None
        return Batch(ids, labels, pos)

    @property
    def epoch(self) -> float:
        return self.windows_consumed / self.windows.per_epoch

    def state_dict(self) -> dict:
        w = self.windows
        return {"windows_consumed": self.windows_consumed, "seq_len": w.seq_len, "mode": w.mode, "seed": w.seed,
                "n_sentences": len(w.table), "windows_per_epoch": w.per_epoch}

    def load_state_dict(self, state: dict) -> None:
        w = self.windows
        mine = {"seq_len": w.seq_len, "mode": w.mode, "seed": w.seed, "n_sentences": len(w.table)}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("cannot resume the data stream: " + ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in diff.items()))
        self.windows_consumed = int(state["windows_consumed"])
