"""Weighted mixtures of sources and the rank-sharded loader over them.

Each source (a folder of shards, `lvm.data.windows.source.SourceWindows`) is its own deterministic stream
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

Data that changed since the checkpoint (a corpus that grew: more shards, other counts) is refused, unless
the run asks to continue (`--data-changed continue`): then the windows from the checkpoint's position on
are a new layout over the data as it is now, starting with each source's next whole epoch (epochs by the
checkpoint's own count, so no epoch's order is drawn twice); the step, the optimizer and the schedule go
on. The loader then also keeps where that layout began (`origin`, `epoch_base`) and what was read before.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from lvm.data.windows.batch import Batch
from lvm.data.windows.source import SourceWindows

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
        # after a data change (`--data-changed continue`): global window `origin` is the first of this layout, and
        # source s begins at its epoch `epoch_base[s]`
        self.origin = 0
        self.epoch_base = np.zeros(len(sources), np.int64)

    def window(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
        """(input_ids, targets, position_ids or None, source index) of global window g."""
        s, i = self.schedule.at(g - self.origin)
        ids, targets, pos = self.sources[s].window(int(self.epoch_base[s]) * self.sources[s].per_epoch + i)
        return ids, targets, pos, s

    def drawn(self, g: int) -> np.ndarray:
        """Windows of each source among global windows origin..g-1 (this layout's)."""
        return self.schedule.drawn(max(0, g - self.origin))

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
        self._tokens_before: dict[str, int] = {}  # input tokens by source read before a data change (`--data-changed continue`)
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
        """Windows of each source drawn in this layout (all of the run's, unless the data changed on a resume)."""
        return self.windows.drawn(self.windows_consumed)

    def tokens_by_source(self) -> dict[str, int]:
        """Input tokens of the windows drawn so far from each source, by all ranks, PAD left out
        (`SourceWindows.input_tokens`: seq_len per concat window, the stream's stride, a concat window's extra
        token being only a target; a sentence window's sentences without its PAD tail); after a data change,
        those read before it plus this layout's."""
        n = self.windows_by_source()
        out = {}
        for k, (name, src) in enumerate(zip(self.windows.names, self.windows.sources, strict=True)):
            skip = int(self.windows.epoch_base[k]) * src.per_epoch
            out[name] = self._tokens_before.get(name, 0) + src.input_tokens(skip + int(n[k])) - src.input_tokens(skip)
        return out

    def epochs_by_source(self) -> dict[str, float]:
        n = self.windows_by_source()
        return {name: float(self.windows.epoch_base[k]) + float(n[k]) / src.per_epoch
                for k, (name, src) in enumerate(zip(self.windows.names, self.windows.sources, strict=True))}

    @property
    def epoch(self) -> float:
        """Epochs of the first source (the only one of a single-source run)."""
        return next(iter(self.epochs_by_source().values()))

    def state_dict(self) -> dict:
        state = {"format": STREAM_FORMAT, "windows_consumed": self.windows_consumed, **self.windows.identity(),
                 "names": self.windows.names}
        if self.windows.origin:  # only after a data change: other checkpoints keep their old form
            state.update(origin=self.windows.origin, epoch_base=self.windows.epoch_base.tolist(),
                         tokens_before=dict(self._tokens_before))
        return state

    def load_state_dict(self, state: dict, data_changed: str = "refuse") -> str | None:
        """Continue the stream of a checkpoint's loader state. Data that changed since (`data_change`) is refused,
        or with data_changed="continue" a new layout over the data as it is now begins at the checkpoint's window
        (module doc); returns that one line to log (None when nothing changed)."""
        change = data_change(state, self.windows)
        self._drop_ahead()
        self.windows_consumed = int(state["windows_consumed"])
        if change is None:
            self.windows.origin = int(state.get("origin", 0))
            self.windows.epoch_base = np.array(state.get("epoch_base", [0] * len(self.windows.sources)), np.int64)
            self._tokens_before = dict(state.get("tokens_before", {}))
            return None
        if data_changed != "continue":
            raise ValueError(refusal(change))
        epochs, tokens = progress(state)
        base = [math.ceil(epochs.get(name, 0.0) - 1e-9) for name in self.windows.names]
        self.windows.origin = self.windows_consumed
        self.windows.epoch_base = np.array(base, np.int64)
        self._tokens_before = {name: tokens.get(name, 0) for name in self.windows.names}
        starts = ", ".join(f"{n} epoch {e}" for n, e in zip(self.windows.names, base, strict=True))
        return (f"data changed since the checkpoint ({change}); --data-changed continue: step, optimizer and schedule "
                f"kept, a new epoch layout over the data as it is now from global window {self.windows_consumed} ({starts})")


def data_change(state: dict, windows: MixtureWindows) -> str | None:
    """How the data of a checkpoint's loader state (`DistributedLoader.state_dict`, also in run_state.json) differs
    from `windows`' in one phrase, or None when it is the same. Raises ValueError (one line) for what no data change
    explains: an older loader's state, or another window length, packing or seed."""
    if state.get("format") != STREAM_FORMAT:
        raise ValueError("cannot resume the data stream: the checkpoint's loader state is from an older loader "
                         f"(format {state.get('format', 'lvm-windows/1')}, now {STREAM_FORMAT}) whose window order is not "
                         "reproduced; start a new run (--resume none, or another --output)")
    mine = {**windows.identity(), "names": windows.names}
    fixed = {k: (state.get(k), mine[k]) for k in ("seq_len", "mode", "seed") if state.get(k) != mine[k]}
    if fixed:
        raise ValueError("cannot resume the data stream: " + "; ".join(f"{k} was {a}, now {b}" for k, (a, b) in fixed.items()))
    if all(state.get(k) == mine[k] for k in ("sources", "schedule", "names")):
        return None
    old = dict(zip(state.get("names") or [], state.get("sources") or [], strict=False))
    parts = []
    for name, now in zip(mine["names"], mine["sources"], strict=True):
        was = old.pop(name, None)
        if was is None:
            parts.append(f"source {name} is new")
        elif was != now:
            parts.append(f"{name}: " + ", ".join(f"{was.get(k)} -> {v} {k.replace('_', ' ')}"
                                                 for k, v in now.items() if was.get(k) != v))
    parts += [f"source {name} is gone" for name in old]
    if not parts:
        parts.append(f"source weights {state.get('schedule')} -> {mine['schedule']} (of {PERIOD})")
    return "; ".join(parts)


def refusal(change: str, tag: str = "the checkpoint") -> str:
    return (f"cannot resume the data stream: the data changed since {tag} ({change}); resume with --data-changed continue "
            "to keep the step, optimizer and schedule and start a new epoch layout over the data as it is now, or start a "
            "new run (--resume none, or another --output)")


def progress(state: dict) -> tuple[dict[str, float], dict[str, int]]:
    """Epochs and input tokens of each source read by a loader state (by its own schedule and counts)."""
    names, sources, counts = state.get("names") or [], state.get("sources") or [], state.get("schedule") or []
    if not names or len(counts) != len(names):
        return {}, {}
    sched = WeightedSchedule([float(c) for c in counts])
    drawn = sched.drawn(max(0, int(state["windows_consumed"]) - int(state.get("origin", 0))))
    base = state.get("epoch_base") or [0] * len(names)
    before = state.get("tokens_before") or {}
    epochs, tokens = {}, {}
    for k, (name, src) in enumerate(zip(names, sources, strict=True)):
        per = int(src.get("windows_per_epoch") or 1)
        epochs[name] = float(base[k]) + float(drawn[k]) / per
        # concat: seq_len input tokens per window; sentence windows' tokens are not known without their data
        tokens[name] = int(before.get(name, 0)) + (int(drawn[k]) * int(state["seq_len"]) if state.get("mode") == "concat" else 0)
    return epochs, tokens
