"""Best-fit decreasing bin packing of sentences into windows (`--packing sentence`).

`bin_types` packs by counts of sentences per length, in bulk (the counts are recorded with each shard, so the number
of windows of every shard is known before any shard is read); `best_fit`, item by item, is its reference in the tests.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

import numpy as np


def best_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing of sentences (ids from `order`), one item at a time.

    The reference for `bin_types` (which packs by length counts) in the tests."""
    import bisect

    by_len = sorted(order.tolist(), key=lambda i: -min(int(lengths[i]), capacity))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []
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


def bin_types(length_counts: dict[int, int], capacity: int) -> tuple[list[int], list[tuple[int, ...]], list[int]]:
    """Best-fit decreasing over a multiset of lengths given as {length: count}, in bulk.

    Items of equal length are interchangeable, so BFD needs only the counts: returns (class lengths,
    descending; bin compositions as counts per class; how many bins have each composition). The number
    of bins equals item-by-item BFD's. Items longer than `capacity` count as `capacity`."""
    counts: dict[int, int] = defaultdict(int)
    for length, c in length_counts.items():
        if c:
            counts[min(int(length), capacity)] += int(c)
    lens = sorted(counts, reverse=True)
    k = len(lens)
    groups: dict[tuple[int, tuple[int, ...]], int] = {}  # (room, composition) -> bins

    def add(room: int, comp: tuple[int, ...], n: int) -> None:
        groups[(room, comp)] = groups.get((room, comp), 0) + n

    def plus(comp: tuple[int, ...], ci: int, m: int) -> tuple[int, ...]:
        return comp[:ci] + (comp[ci] + m,) + comp[ci + 1 :]

    empty = (0,) * k
    for ci, length in enumerate(lens):
        c = counts[length]
        while c > 0:
            fits = [key for key in groups if key[0] >= length]
            if not fits:  # new bins, each filled with as many as fit
                m = capacity // length
                full, rest = divmod(c, m)
                if full:
                    add(capacity - m * length, plus(empty, ci, m), full)
                if rest:
                    add(capacity - rest * length, plus(empty, ci, rest), 1)
                break
            key = min(fits)  # best fit: the smallest room that holds it
            room, comp = key
            nb = groups.pop(key)
            m = room // length  # a bin keeps taking items while they fit: it stays the best fit
            full = min(nb, c // m)
            if full:
                add(room - m * length, plus(comp, ci, m), full)
                c -= full * m
                nb -= full
            if nb and 0 < c < m:
                add(room - c * length, plus(comp, ci, c), 1)
                nb -= 1
                c = 0
            if nb:
                add(room, comp, nb)
    types = sorted(groups.items(), key=lambda kv: kv[0][1], reverse=True)
    return lens, [comp for (_, comp), _ in types], [n for _, n in types]


@lru_cache(maxsize=4096)
def n_bins(length_counts: tuple[tuple[int, int], ...], capacity: int) -> int:
    """Windows best-fit packing makes of these (length, count) pairs (shards alike share the answer)."""
    return sum(bin_types(dict(length_counts), capacity)[2])
