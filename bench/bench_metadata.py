#!/usr/bin/env python
"""Training start-up at corpus scale: a synthetic make_shards output of 200,000 train shards (index.json as
make_shards writes it; one real shard, hard-linked under every name), opened as one rank of a run does it:
`open_data` (index, listing, checks), `build_windows` (per-shard layouts) and the loader's first micro-batch of
that rank. Each rank is its own fresh process: seconds per stage and the process's peak RSS (VmHWM), and the
os.stat calls it made (per-shard stats are what a parallel file system's metadata server pays for, times the ranks).
Goal: < 5 s and < 300 MB per rank for the data (peak RSS over the RSS after importing torch and the package).

    .venv/bin/python bench/bench_metadata.py [--shards 200000] [--world 64] [--dir /tmp/...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

TOKENIZER = {"spec": "vqgan:/models/lvm-vqgan", "codebook_size": 8192, "tokens_per_image": 256, "image_size": 256}


def make_corpus(root: Path, n_train: int, n_val: int, sentences: int, table: bool = True) -> None:
    """root/{train,val}/u<k>-00000.arrow (hard links of one shard's copies), root/index.json (and index.feather),
    root/tokenizer.json."""
    from lvm.data.shards.format import read_recorded_stats, write_shard

    rng = np.random.default_rng(0)
    rows = []
    for i in range(sentences):
        k = int(rng.integers(1, 5))
        rows.append({"tokens": rng.integers(0, 8192, 256 * k, dtype=np.uint16), "n_images": k,
                     "kind": ("image", "sequence", "video")[i % 3], "id": f"s{i}"})
    proto = root / "proto.arrow"
    root.mkdir(parents=True, exist_ok=True)
    nbytes = write_shard(proto, rows)
    stats = read_recorded_stats(proto)
    shards, links = [], 0
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(exist_ok=True)
        for u in range(n):
            name = f"u{u:06d}-00000.arrow"
            if links == 60_000:  # a file system's limit of links per file (ext4: 65,000): another copy
                proto = root / f"proto{u}.arrow"
                write_shard(proto, rows)
                links = 0
            os.link(proto, root / split / name)
            links += 1
            shards.append({"path": f"{split}/{name}", **stats, "bytes": nbytes})
    (root / "index.json").write_text(json.dumps({"format": "lvm-shards/2", "tokenizer": TOKENIZER, "units": n_train,
                                                 "shards": shards}, indent=2))
    if table:  # index.feather, as make_shards writes it beside index.json
        from lvm.data.shards.index import write_index_table

        write_index_table(root / "index.json", shards)
    (root / "tokenizer.json").write_text(json.dumps(TOKENIZER, indent=2))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would carry the parent's peak across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(root: str, mode: str, rank: int, world: int) -> None:
    """One rank's start-up; prints a JSON line."""
    import torch  # noqa: F401  (imported by training before the data: not counted)

    from lvm.data.mixture import DistributedLoader
    from lvm.train.data_setup import build_windows, open_data

    stats = [0]
    real_stat = os.stat

    def counting_stat(*a, **k):
        stats[0] += 1
        return real_stat(*a, **k)

    os.stat = counting_stat
    base = peak_rss_mb()
    t0 = time.perf_counter()
    sources, _ = open_data(root, rank=rank, world=world)
    t1 = time.perf_counter()
    windows = build_windows(sources, 4096, mode, 0, None)
    t2 = time.perf_counter()
    loader = DistributedLoader(windows, 4, rank, world)
    loader.windows_consumed = 12345 * world * 4  # somewhere in the run, as after a resume
    loader.next_batch()
    t3 = time.perf_counter()
    os.stat = real_stat
    peak = peak_rss_mb()
    print(json.dumps({"open": t1 - t0, "windows": t2 - t1, "first": t3 - t2, "total": t3 - t0, "peak_mb": peak,
                      "base_mb": base, "stats": stats[0], "shards": sources[0].train.n_shards}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=200_000)
    ap.add_argument("--val-shards", type=int, default=64)
    ap.add_argument("--sentences", type=int, default=64, help="sentences of the (one) real shard")
    ap.add_argument("--world", type=int, default=64)
    ap.add_argument("--no-table", action="store_true", help="no index.feather: parse index.json (make_shards before it)")
    ap.add_argument("--dir", default=None, help="where to build the corpus (default: a temporary folder)")
    ap.add_argument("--child", nargs=4, metavar=("ROOT", "MODE", "RANK", "WORLD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        root, mode, rank, world = args.child
        child(root, mode, int(rank), int(world))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "corpus"
        t = time.perf_counter()
        make_corpus(root, args.shards, args.val_shards, args.sentences, not args.no_table)
        made = time.perf_counter() - t
        index_mb = (root / "index.json").stat().st_size / 2**20
        rows = []
        for mode in ("concat", "sentence"):
            for rank in (0, args.world - 1):
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                r = subprocess.run([sys.executable, __file__, "--child", str(root), mode, str(rank), str(args.world)],
                                   capture_output=True, text=True, env=env)
                if r.returncode:
                    raise SystemExit(r.stderr[-3000:])
                d = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append([mode, f"{rank}/{args.world}", d["shards"], d["open"], d["windows"], d["first"], d["total"],
                             d["stats"], round(d["base_mb"]), round(d["peak_mb"]), round(d["peak_mb"] - d["base_mb"]),
                             "yes" if d["total"] < 5 and d["peak_mb"] - d["base_mb"] < 300 else "NO"])
        table = "index.json parsed" if args.no_table else "index.feather read"
        print_table(f"start-up per rank: {args.shards:,} train + {args.val_shards} val shards, index.json {index_mb:.0f} MB, {table} "
                    f"(corpus made in {made:.0f}s); seq 4096, micro batch 4",
                    ["packing", "rank", "shards", "open_data s", "windows s", "first batch s", "total s", "os.stat calls",
                     "RSS after imports MB", "peak RSS MB", "data MB", "< 5 s, < 300 MB"], rows)


if __name__ == "__main__":
    main()
