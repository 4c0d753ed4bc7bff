import os
import socket
import subprocess
import sys
from pathlib import Path

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
    r = subprocess.run(train_cmd(nproc, args), capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def base_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(shards), "--output", str(out), "--seq-len", "256", "--micro-batch", "2",
            "--warmup-steps", "2", "--lr", "3e-3", "--min-lr", "3e-4", "--log-every", "1", "--eval-every", "0", *extra]


def read_metrics(run: Path) -> dict[int, dict]:
    import json

    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["split"] == "train":
            rows[r["step"]] = r  # a resumed run re-logs steps: the last word counts
    return rows
