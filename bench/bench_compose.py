#!/usr/bin/env python
"""Composing sentences from a token store: sentences per minute, on 1 and 2 ranks (processes).

A synthetic store of PAIRS (input, label) pairs with random codes (written with the store's own writer, no
tokenizer run) is composed into SENTENCES sentences of 8 pairs = 16 images (4096 tokens) by
`data_prep/compose.py`, as a user runs it: each rank a process (`--rank/--world-size`), then `--index-only`.
Wall time runs from the first process's start to the index; the shards go to a temporary folder on the same disk
as --tmp and are deleted after each row.

    python bench/bench_compose.py [--pairs 100000] [--sentences 1000000] [--ranks 1 2] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from lvm.data.offline.units import Unit  # noqa: E402
from lvm.data.store_build import write_store_index, write_unit  # noqa: E402
from lvm.data.store_plan import plan_records  # noqa: E402
from lvm.data.store_records import Record  # noqa: E402
from lvm.model.vocab import CODEBOOK_SIZE, IMAGE_SIZE, TOKENS_PER_IMAGE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHOTS = 8
TOKENIZER_INFO = {"spec": "patch-kmeans", "kind": "patch-kmeans", "codebook_size": CODEBOOK_SIZE, "image_size": IMAGE_SIZE,
                  "tokens_per_image": TOKENS_PER_IMAGE, "details": {"synthetic": True}}


def synthetic_store(root: Path, pairs: int, units: int = 4, seed: int = 0) -> Path:
    """A finished store of `pairs` pairs of task "bench" in `units` units, random codes."""
    rng = np.random.default_rng(seed)
    per = -(-pairs // units)
    plan = [Unit(f"bench{u:03d}", "synthetic", "", size=min(per, pairs - u * per)) for u in range(units)]
    records = [[Record(f"p{u.name}/{i}", "pair", "bench", "bench", (f"image:x{u.name}/{i}", f"image:y{u.name}/{i}"))
                for i in range(u.size)] for u in plan]
    plans = plan_records(records)
    for unit, p in zip(plan, plans, strict=True):
        codes = rng.integers(0, CODEBOOK_SIZE, (p.images, TOKENS_PER_IMAGE), dtype=np.uint16)
        write_unit(root, unit, p, codes, {})
    write_store_index(root, plan, plans, TOKENIZER_INFO)
    return root


def compose_run(store: Path, out: Path, epochs: int, ranks: int) -> float:
    args = [sys.executable, str(REPO / "data_prep" / "compose.py"), "--store", str(store), "--out", str(out), "--pairs",
            "bench", "--shots", str(SHOTS), "--epochs", str(epochs), "--val-fraction", "0", "--no-progress"]
    t = time.perf_counter()
    procs = [subprocess.Popen([*args, "--rank", str(r), "--world-size", str(ranks)], stdout=subprocess.DEVNULL)
             for r in range(ranks)]
    if any(p.wait() for p in procs):
        raise SystemExit("error: a compose rank failed")
    if ranks > 1:
        subprocess.run([*args, "--index-only"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=100_000, help="pairs in the synthetic store")
    p.add_argument("--sentences", type=int, default=1_000_000, help="sentences to compose (rounded up to whole epochs)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="compose processes, one row each")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the store and the shards are written")
    a = p.parse_args(argv)
    per_epoch = -(-a.pairs // SHOTS)
    epochs = -(-a.sentences // per_epoch)
    rows = []
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        t = time.perf_counter()
        store = synthetic_store(Path(tmp) / "store", a.pairs)
        print(f"synthetic store: {a.pairs:,} pairs ({2 * a.pairs:,} images) in {time.perf_counter() - t:.1f}s; "
              f"{epochs} epochs of {per_epoch:,} sentences", flush=True)
        for ranks in a.ranks:
            out = Path(tmp) / f"out{ranks}"
            seconds = compose_run(store, out, epochs, ranks)
            index = json.loads((out / "index.json").read_text())
            n = index["totals"]["train"]["sentences"]
            size = index["totals"]["train"]["bytes"]
            rows.append([ranks, f"{n:,}", f"{index['totals']['train']['images'] // max(n, 1)}", f"{seconds:.1f}",
                         f"{n / seconds * 60:,.0f}", f"{n * SHOTS * 2 * TOKENS_PER_IMAGE / seconds / 1e6:.1f}",
                         f"{size / 2**30:.2f}"])
            print(f"ranks {ranks}: {n:,} sentences in {seconds:.1f}s", flush=True)
            shutil.rmtree(out)
    print_table(f"compose from a token store ({a.pairs:,} pairs, {SHOTS} pairs = {2 * SHOTS} images per sentence)",
                ["ranks", "sentences", "images/sentence", "wall s", "sentences/min", "M tokens/s", "GiB written"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
