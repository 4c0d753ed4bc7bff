#!/usr/bin/env python
"""Resuming on another number of ranks: what the universal conversion and the re-partitioned load cost.

For each model (--models, default tiny and 100m) and ZeRO stage (2, 3): `launch/pretrain.py` trains one
step on 2 ranks (CPU, gloo, fp32, seq 256, micro batch 1) and saves a checkpoint; then
- the conversion into DeepSpeed's universal checkpoint (`lvm.train.elastic.convert_to_universal`, the
  converter as its own process, as a resume runs it) is timed, with the sizes of both folders;
- the same command on 1 rank resumes it (the conversion already done, so reused) and trains one more
  step: the time from its start to its `resumed from` line, and to its first step.
CPU numbers: on GPUs the conversion is the same CPU work (it reads and writes the checkpoint files);
the load scales with the checkpoint's bytes and the file system.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from lvm.data.shards.format import write_shard  # noqa: E402
from lvm.model.presets import count_parameters, llama_config  # noqa: E402
from lvm.train import elastic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(out: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [{"tokens": rng.integers(0, 8192, 256 * 4).astype(np.uint16), "n_images": 4, "kind": "sequence", "id": f"s{i}"}
            for i in range(64)]
    write_shard(out / "train" / "s-00000.arrow", rows)
    (out / "tokenizer.json").write_text(json.dumps({"spec": "patch-kmeans:synthetic", "kind": "patch-kmeans",
                                                    "codebook_size": 8192, "image_size": 256, "tokens_per_image": 256}))


def train(nproc: int, args: list[str]) -> tuple[str, float]:
    if nproc == 1:
        cmd = [sys.executable, "launch/pretrain.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), "launch/pretrain.py", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env={**ENV, "MASTER_PORT": str(free_port())}, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"training failed: {r.stderr.strip().splitlines()[-1]}")
    return r.stdout, time.perf_counter() - t0


def mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def stamp(out: str, pattern: str) -> float:
    """The run's own elapsed-seconds stamp on the first line matching `pattern`."""
    for line in out.splitlines():
        if re.search(pattern, line):
            return float(line.split("]")[0].strip("[ s"))
    raise SystemExit(f"no line matching {pattern!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "100m"])
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_data(tmp / "data")
        for model in a.models:
            n = count_parameters(llama_config(model, 256))
            for stage in (2, 3):
                run = tmp / f"{model}-z{stage}"
                args = ["--data", str(tmp / "data"), "--output", str(run), "--model", model, "--seq-len", "256",
                        "--micro-batch", "1", "--ds_config", f"ds_configs/zero{stage}.json", "--warmup-steps", "0",
                        "--eval-every", "0", "--log-every", "1", "--save-every", "1000"]
                train(2, [*args, "--max-steps", "1"])
                ckpts = run / "checkpoints"
                t0 = time.perf_counter()
                name = elastic.convert_to_universal(ckpts, "step_00000001")
                convert = time.perf_counter() - t0
                sizes = mib(ckpts / "step_00000001"), mib(ckpts / name)  # the resume prunes the converted copy
                out, wall = train(1, [*args, "--max-steps", "2"])
                assert "re-partitioned" in out
                rows.append([model, f"{n / 1e6:.1f}M", stage, *sizes, convert, stamp(out, "resumed from"),
                             stamp(out, r"step 2/2"), wall])
                shutil.rmtree(run)
    print_table("Resume on another world size (2 ranks -> 1, CPU, fp32): universal conversion and load",
                ["model", "params", "ZeRO", "checkpoint MiB", "universal MiB", "convert s", "to resumed s",
                 "to first step s", "run wall s"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
