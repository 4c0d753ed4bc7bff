"""Small helpers shared by the bench scripts: timing and table printing."""

from __future__ import annotations

import statistics
import time


def timed(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:,.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    print(f"\n{title}\n{line}")
    for k, r in enumerate(cells):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if k == 0:
            print(line)
    print(line)
