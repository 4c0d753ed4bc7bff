#!/usr/bin/env python
"""Training data at corpus scale: start-up and memory of one training rank vs the number of sentences.

Writes synthetic shards of 100k, 1M and 10M single-image sentences (1M sentences per shard, with
index.json and tokenizer.json as make_shards writes them), then for each size and packing mode:
- time to the first training step and peak RSS (VmHWM) of one rank: `launch/pretrain.py` (tiny model,
  seq 4096, ZeRO-2, CPU) as its own process, timed from its start to its `step 1/` line, and the part
  of it spent opening the data (the run's own `data: ... opened in` line);
- window fetch time in a fresh process: consecutive global windows from 4 random places of the run
  (what a rank reads; mean and p99), and windows at random (no locality); the loader's tokens/s
  (micro-batches of 8, no prefetch thread) against what a training step consumes (the same run's
  step 3) and against 46k tokens/s (a 1B model on one H100 at 4k context, DESIGN.md's anchor).
Every measurement starts with the shards dropped from the page cache (cold); each training run is
repeated (--repeats, the minimum is shown: the machine may be shared).
Goals (issue 11): from 100k to 10M sentences < 3 s and < 300 MB more; fetch < 1 ms at 10M; loader >= 100x a step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from lvm.data.shards.format import read_recorded_stats, write_columns  # noqa: E402
from lvm.model.vocab import TOKENS_PER_IMAGE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PER_SHARD = 1_000_000
SEQ = 4096
GPU_ANCHOR = 46_000  # tokens/s of a 1B model on one H100 at 4k context (DESIGN.md)


def write_corpus(out: Path, n: int, seed: int = 0) -> float:
    """n single-image sentences of random codes in shards of PER_SHARD; returns seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    entries = []
    for s, lo in enumerate(range(0, n, PER_SHARD)):
        k = min(PER_SHARD, n - lo)
        flat = np.frombuffer(rng.bytes(2 * k * TOKENS_PER_IMAGE), np.uint16) & 8191
        offsets = np.arange(k + 1, dtype=np.int64) * TOKENS_PER_IMAGE
        kinds = pa.DictionaryArray.from_arrays(pa.array(np.zeros(k, np.int8)), pa.array(["image"])).cast(pa.string())
        ids = pa.array([f"img/{lo + i}" for i in range(k)])
        path = out / "train" / f"synthetic-{s:05d}.arrow"
        nbytes = write_columns(path, flat, offsets, np.ones(k, np.int32), kinds, ids)
        rec = read_recorded_stats(path)
        entries.append({"path": f"train/{path.name}", "sentences": k, "images": k, "tokens": rec["tokens"],
                        "max_token": rec["max_token"], "bytes": nbytes, "kinds": rec["kinds"]})
        del flat
    tok = {"spec": "patch-kmeans:synthetic", "kind": "patch-kmeans", "codebook_size": 8192, "image_size": 256,
           "tokens_per_image": 256, "details": {"synthetic": True}}
    (out / "tokenizer.json").write_text(json.dumps(tok))
    (out / "index.json").write_text(json.dumps({"format": "lvm-shards/2", "tokenizer": tok, "shards": entries}))
    return time.perf_counter() - t0


def evict(data: Path) -> None:
    """Drop the shards from the page cache: each measurement starts cold, as on a corpus larger than memory."""
    for f in (data / "train").glob("*.arrow"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM of a process: its own peak RSS (ru_maxrss would also count the parent's memory at fork)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def first_step(data: Path, mode: str, run: Path, port: int) -> dict:
    """One rank of launch/pretrain.py: seconds to its first step, peak RSS, step-3 tokens/s."""
    cmd = [sys.executable, "launch/pretrain.py", "--data", str(data), "--output", str(run), "--model", "tiny",
           "--seq-len", str(SEQ), "--micro-batch", "1", "--max-steps", "3", "--log-every", "1", "--eval-every", "0",
           "--save-every", "1000", "--packing", mode, "--ds_config", "ds_configs/zero2.json", "--warmup-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    shutil.rmtree(run, ignore_errors=True)
    evict(data)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t_first, t_data, tail, hwm = None, None, [], 0
    for line in proc.stdout:
        tail = (tail + [line])[-30:]
        hwm = max(hwm, peak_rss_mb(proc.pid))  # a high-water mark: the last read before exit holds it
        if t_first is None and "step 1/" in line:
            t_first = time.perf_counter() - t0
        m = re.search(r"data: .* opened in ([0-9.]+)s", line)
        if m:
            t_data = float(m.group(1))
    _, status, _ = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or t_first is None:
        raise SystemExit(f"training run failed ({proc.returncode}):\n{''.join(tail)}")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {"first_step_s": t_first, "data_s": t_data, "peak_rss_mb": hwm, "step_tps": rows[-1]["tokens_per_s"]}


FETCH = """
import json, sys, time
from pathlib import Path
import numpy as np
from lvm.data.mixture import DistributedLoader
from lvm.train.data_setup import build_windows, open_data
t0 = time.perf_counter()
sources, _ = open_data([sys.argv[1]])
windows = build_windows(sources, {seq}, sys.argv[2], 0, None)
t_open = time.perf_counter() - t0
w = windows.sources[0]
rng = np.random.default_rng(1)
seq_times = []  # what a rank reads: consecutive global windows, from a few places in the run
for start in rng.integers(0, 3 * w.per_epoch, 4).tolist():
    for g in range(start, start + 500):
        t = time.perf_counter(); windows.window(g); seq_times.append(time.perf_counter() - t)
rand_times = []  # no locality at all: every window somewhere else
for g in rng.integers(0, 3 * w.per_epoch, 500).tolist():
    t = time.perf_counter(); windows.window(g); rand_times.append(time.perf_counter() - t)
loader = DistributedLoader(windows, 8)
loader.load_state_dict({{**loader.state_dict(), "windows_consumed": int(rng.integers(0, w.per_epoch))}})
t = time.perf_counter()
for _ in range(100):
    loader.next_batch()
tps = 100 * 8 * {seq} / (time.perf_counter() - t)
print(json.dumps({{"open_s": t_open, "per_epoch": w.per_epoch, "fetch_us": 1e6 * float(np.mean(seq_times)),
                  "fetch_p99_us": 1e6 * float(np.percentile(seq_times, 99)), "random_us": 1e6 * float(np.mean(rand_times)),
                  "loader_tps": tps,
                  "rss_mb": int(next(x for x in Path("/proc/self/status").read_text().splitlines()
                                     if x.startswith("VmHWM:")).split()[1]) / 1024}}))
"""


def fetch(data: Path, mode: str) -> dict:
    evict(data)
    r = subprocess.run([sys.executable, "-c", FETCH.format(seq=SEQ), str(data), mode], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise SystemExit(f"fetch timing failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000], help="sentences per corpus")
    p.add_argument("--modes", nargs="+", default=["concat", "sentence"], choices=["concat", "sentence"])
    p.add_argument("--repeats", type=int, default=3, help="training runs per size and mode (the minimum is shown)")
    p.add_argument("--tmp", default=None, help="folder for the synthetic shards (default: the system temp folder)")
    a = p.parse_args(argv)
    rows, got = [], {}
    port = 29900 + os.getpid() % 50
    for n in a.sizes:
        with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
            data = Path(tmp) / "shards"
            secs = write_corpus(data, n)
            gb = sum(f.stat().st_size for f in (data / "train").glob("*.arrow")) / 1e9
            print(f"wrote {n:,} sentences ({gb:.2f} GB) in {secs:.1f}s", file=sys.stderr, flush=True)
            for mode in a.modes:
                runs = [first_step(data, mode, Path(tmp) / f"run-{mode}", port) for _ in range(a.repeats)]
                r = {k: min(x[k] for x in runs) for k in ("first_step_s", "data_s", "peak_rss_mb")}
                r["step_tps"] = max(x["step_tps"] for x in runs)
                r.update(fetch(data, mode))
                got[(n, mode)] = r
                rows.append([f"{n:,}", mode, f"{r['first_step_s']:.2f}", f"{r['data_s']:.3f}", f"{r['peak_rss_mb']:,.0f}",
                             f"{r['fetch_us']:.0f} / {r['fetch_p99_us']:.0f}", f"{r['random_us']:.0f}",
                             f"{r['loader_tps'] / 1e6:.1f}M", f"{r['rss_mb']:,.0f}",
                             f"{r['loader_tps'] / r['step_tps']:,.0f}x", f"{r['loader_tps'] / GPU_ANCHOR:,.0f}x"])
                print(f"  {mode}: {r}", file=sys.stderr, flush=True)
    print_table("Training data at scale (one rank; tiny model, seq 4096, CPU)",
                ["sentences", "packing", "to 1st step s", "of it data s", "peak RSS MB", "fetch us mean/p99",
                 "random g us", "loader tok/s", "loader RSS MB", "vs CPU step", "vs 46k tok/s GPU"], rows)
    lo, hi = min(a.sizes), max(a.sizes)
    if lo != hi:
        summary = []
        for mode in a.modes:
            d_t = got[(hi, mode)]["first_step_s"] - got[(lo, mode)]["first_step_s"]
            d_d = got[(hi, mode)]["data_s"] - got[(lo, mode)]["data_s"]
            d_m = got[(hi, mode)]["peak_rss_mb"] - got[(lo, mode)]["peak_rss_mb"]
            summary.append([mode, f"{d_t:+.2f} s (goal < 3)", f"{d_d:+.3f} s", f"{d_m:+,.0f} MB (goal < 300)",
                            f"{got[(hi, mode)]['fetch_us']:.0f} us (goal < 1000)"])
        print_table(f"From {lo:,} to {hi:,} sentences", ["packing", "time to 1st step", "data start-up", "peak RSS", f"fetch at {hi:,}"], summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
