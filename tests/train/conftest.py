import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = str(REPO / "launch" / "pretrain.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, PRETRAIN, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), PRETRAIN, *args]


def run_train(nproc: int, args: list[str], check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**ENV, "MASTER_PORT": str(free_port())} if nproc == 1 else ENV  # a lone process still opens a port
    r = subprocess.run(train_cmd(nproc, args), capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def base_args(shards: Path | list[Path], out: Path, *extra: str) -> list[str]:
    data = [str(s) for s in shards] if isinstance(shards, (list, tuple)) else [str(shards)]
    return ["--data", *data, "--output", str(out), "--seq-len", "256", "--micro-batch", "2",
            "--warmup-steps", "2", "--lr", "3e-3", "--min-lr", "3e-4", "--log-every", "1", "--eval-every", "0", *extra]


def read_metrics(run: Path) -> dict[int, dict]:
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["split"] == "train":
            rows[r["step"]] = r  # a resumed run re-logs steps: the last word counts
    return rows


@pytest.fixture(scope="session")
def second_source(train_shards, tmp_path_factory) -> Path:
    """Another source made by the same tokenizer (tokenizer.json equal): single images, train/ and val/."""
    from lvm.data.shards.format import write_shard
    from lvm.data.shards.shard_set import read_tokenizer_info

    out = tmp_path_factory.mktemp("second") / "laion"
    info = read_tokenizer_info(train_shards)
    kind, _, path = info["spec"].partition(":")
    if path and not Path(path).is_absolute():  # the same tokenizer, named from here
        info["spec"] = f"{kind}:{(train_shards / path).resolve()}"
    rng = np.random.default_rng(5)
    pattern = rng.integers(0, 8192, 256, dtype=np.uint16)
    for split, n_shards in (("train", 3), ("val", 1)):
        for s in range(n_shards):
            rows = [{"tokens": np.where(rng.random(256) < 0.3, rng.integers(0, 8192, 256), pattern).astype(np.uint16),
                     "n_images": 1, "kind": "image", "id": f"{split}-{s}-{i}"} for i in range(12)]
            write_shard(out / split / f"img-{s:05d}.arrow", rows)
    (out / "tokenizer.json").write_text(json.dumps(info))
    return out
