"""The seeded orders of the windows: a 64-bit mix of integers (splitmix64), numpy generators seeded by words, and
`feistel`, a keyed pseudo-random permutation whose position i is computed directly (no table, no pass over earlier
positions), so any window's place in the read order is known at once.
"""

from __future__ import annotations

import numpy as np

M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def mix64(*words: int) -> int:
    h = 0x243F6A8885A308D3
    for w in words:
        h = _splitmix64(h ^ (int(w) & M64))
    return h


def feistel(i: int, n: int, key: int, rounds: int = 4) -> int:
    """Position i of a keyed pseudo-random permutation of range(n): a balanced Feistel network on
    the smallest even-bit domain >= n, cycle-walking until the value falls inside range(n)."""
    if not 0 <= i < n:
        raise IndexError(f"{i} outside range({n})")
    if n <= 2:
        return i if n == 1 or (key & 1) == 0 else 1 - i
    half = ((n - 1).bit_length() + 1) // 2
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for r in range(rounds):
            left, right = right, left ^ (_splitmix64(key ^ (r << 58) ^ right) & mask)
        x = (left << half) | right
        if x < n:
            return x


def seeded_rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) for w in words])
