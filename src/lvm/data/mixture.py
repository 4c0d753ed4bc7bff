"""Weighted mixtures of sources and the rank-sharded loader over them.

Each source (a folder of shards, `lvm.data.packing.SourceWindows`) is its own deterministic stream
of windows with its own epochs. Global window g of the run is drawn from one source by a fixed,
periodic schedule: the weights are apportioned into integer counts n_s over a period of
`PERIOD` windows (each source at least one), and the period lists the windows (s, t), t < n_s, in
the order of (t + 1/2) / n_s (ties by source). This spreads every source evenly over the period, so
after g windows source s has been drawn g * n_s / PERIOD times to within two windows, at every g, not
only on average (largest deviation over a period: 0.5 for two equal sources, 0.65 for 0.6/0.3/0.1, 1.7
for LVM's 0.885/0.072/0.042/0.0006/0.0005, 0.94 for 30 random weights). Window g is source s = seq[g mod PERIOD]'s window
(g div PERIOD) * n_s + t: computed directly, so resume is exact and costs nothing.

A micro-step consumes `world_size * micro_batch` consecutive global windows, rank r taking its
slice: ranks never read the same window. The loader's only state is `windows_consumed`; a resumed
run sees exactly the windows the uninterrupted one would have seen next, for any world size with
the same global batch.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from lvm.data.packing import Batch, SourceWindows

PERIOD = 1 << 16
# The order and the inputs of the windows. Unchanged when windows gained the target of their last position
# (a concat window reads one token more, the next window's first): the same windows follow a resume.
STREAM_FORMAT = "lvm-windows/2"


def apportion(weights: list[float], total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (largest remainder), each >= 1."""
    w = np.asarray(weights, np.float64)
    if len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be positive numbers, got {list(weights)}")
    if len(w) > total:
        raise ValueError(f"at most {total} sources")
    quota = w / w.sum() * total
    counts = np.floor(quota).astype(np.int64)
    rest = total - int(counts.sum())
    counts[np.argsort(-(quota - counts), kind="stable")[:rest]] += 1
    for s in np.flatnonzero(counts == 0):
        counts[s] = 1
        counts[int(np.argmax(counts))] -= 1
    return counts


class WeightedSchedule:
    """Which source global window g comes from, and which window of that source it is."""

    def __init__(self, weights: list[float]):
        self.period = 1 if len(weights) == 1 else PERIOD
        self.counts = apportion(weights, self.period)
        src = np.repeat(np.arange(len(self.counts)), self.counts)
        rank = np.concatenate([np.arange(n) for n in self.counts])
        key = (rank + 0.5) / self.counts[src]  # exact ties between equal fractions: float division rounds alike
        order = np.lexsort((src, key))
        self.source = src[order].astype(np.int32)
        self.rank = rank[order]

    def at(self, g: int) -> tuple[int, int]:
        q, r = divmod(g, self.period)
        s = int(self.source[r])
        return s, q * int(self.counts[s]) + int(self.rank[r])

    def drawn(self, g: int) -> np.ndarray:
        """Windows of each source among global windows 0..g-1."""
        q, r = divmod(g, self.period)
        return q * self.counts + np.bincount(self.source[:r], minlength=len(self.counts))


class MixtureWindows:
    """Global window g of a run over one or more weighted sources."""

    def __init__(self, sources: list[SourceWindows], names: list[str] | None = None, weights: list[float] | None = None):
        if not sources:
            raise ValueError("no sources")
        names = names or [f"source{k}" for k in range(len(sources))]
        if len(names) != len(sources) or (weights is not None and len(weights) != len(sources)):
            raise ValueError(f"{len(sources)} sources, {len(names)} names, {len(weights or [])} weights")
        modes = {(s.seq_len, s.mode, s.seed) for s in sources}
        if len(modes) != 1:
            raise ValueError(f"sources differ in (seq_len, mode, seed): {sorted(modes)}")
        self.sources, self.names = sources, list(names)
        self.seq_len, self.mode, self.seed = sources[0].seq_len, sources[0].mode, sources[0].seed
        if weights is None:  # proportional to tokens
            weights = [float((s.shards.tokens + 2 * s.shards.sentences).sum()) for s in sources]
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        self.schedule = WeightedSchedule(self.weights)

    def window(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
        """(input_ids, targets, position_ids or None, source index) of global window g."""
        s, i = self.schedule.at(g)
        ids, targets, pos = self.sources[s].window(i)
        return ids, targets, pos, s

    def identity(self) -> dict:
        return {"seq_len": self.seq_len, "mode": self.mode, "seed": self.seed,
                "sources": [s.identity() for s in self.sources], "schedule": self.schedule.counts.tolist()}


class DistributedLoader:
    """Micro-batches of windows for one data-parallel rank; state = windows consumed globally.

    With prefetch=k a background thread assembles this rank's next k micro-batches while the current
    one trains (the order is known in advance, so prefetching changes nothing but the waiting); with
    pin=True (CUDA) it also pins them, so `.to(device, non_blocking=True)` copies asynchronously.
    """

    def __init__(self, windows: MixtureWindows | SourceWindows, micro_batch: int, rank: int = 0, world_size: int = 1,
                 prefetch: int = 0, pin: bool = False):
        if isinstance(windows, SourceWindows):
            windows = MixtureWindows([windows])
        self.windows, self.micro_batch, self.rank, self.world_size = windows, micro_batch, rank, world_size
        self.windows_consumed = 0
        self.prefetch, self.pin = prefetch, pin
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: deque = deque()  # (first global window, future of its Batch), in order

    def indices(self) -> list[int]:
        """Global windows this rank reads in its next micro-batch."""
        first = self.windows_consumed + self.rank * self.micro_batch
        return list(range(first, first + self.micro_batch))

    def _make(self, first: int) -> Batch:
        parts = [self.windows.window(g) for g in range(first, first + self.micro_batch)]
        ids = torch.from_numpy(np.stack([p[0] for p in parts]))
        targets = torch.from_numpy(np.stack([p[1] for p in parts]))
        pos = torch.from_numpy(np.stack([p[2] for p in parts])) if parts[0][2] is not None else None
        batch = Batch(ids, targets, pos, torch.tensor([p[3] for p in parts], dtype=torch.long))
        if self.pin:  # CUDA only: page-locked host memory for asynchronous copies
            batch = Batch(*(t.pin_memory() if t is not None else None
                            for t in (batch.input_ids, batch.targets, batch.position_ids)), batch.sources)
        return batch

    def next_batch(self) -> Batch:
        first = self.windows_consumed + self.rank * self.micro_batch
        stride = self.world_size * self.micro_batch
        if self.prefetch > 0:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="lvm-loader")
            while len(self._ahead) <= self.prefetch:
                nxt = self._ahead[-1][0] + stride if self._ahead else first
                self._ahead.append((nxt, self._pool.submit(self._make, nxt)))
            at, future = self._ahead.popleft()
            assert at == first, (at, first)
            batch = future.result()
        else:
            batch = self._make(first)
        self.windows_consumed += stride
        return batch

    def _drop_ahead(self) -> None:
        for _, future in self._ahead:
            future.cancel()
            if not future.cancelled():
                future.exception()  # wait for it; an error there concerns windows nobody will read
        self._ahead.clear()

    def close(self) -> None:
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def windows_by_source(self) -> np.ndarray:
        return self.windows.schedule.drawn(self.windows_consumed)

    def tokens_by_source(self) -> dict[str, int]:
        """Input tokens of the windows drawn so far from each source, by all ranks, PAD left out
        (`SourceWindows.input_tokens`: seq_len per concat window, the stream's stride, a concat window's extra
        token being only a target; a sentence window's sentences without its PAD tail)."""
        n = self.windows_by_source()
        return {name: src.input_tokens(int(n[k]))
                for k, (name, src) in enumerate(zip(self.windows.names, self.windows.sources, strict=True))}

    def epochs_by_source(self) -> dict[str, float]:
        n = self.windows_by_source()
        return {name: float(n[k]) / src.per_epoch for k, (name, src) in enumerate(zip(self.windows.names, self.windows.sources, strict=True))}

    @property
    def epoch(self) -> float:
        """Epochs of the first source (the only one of a single-source run)."""
        return float(self.windows_by_source()[0]) / self.windows.sources[0].per_epoch

    def state_dict(self) -> dict:
        return {"format": STREAM_FORMAT, "windows_consumed": self.windows_consumed, **self.windows.identity(),
                "names": self.windows.names}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STREAM_FORMAT:
            raise ValueError("cannot resume the data stream: the checkpoint's loader state is from an older loader "
                             f"(format {state.get('format', 'lvm-windows/1')}, now {STREAM_FORMAT}) whose window order is not "
                             "reproduced; start a new run (--resume none, or another --output)")
        mine = self.windows.identity()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("cannot resume the data stream: " + "; ".join(f"{k} was {a}, now {b}" for k, (a, b) in diff.items()))
        self._drop_ahead()
        self.windows_consumed = int(state["windows_consumed"])
