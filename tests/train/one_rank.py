"""One-process training runs on a free rendezvous port (a fixed 29500 collides with runs beside this one)."""

import subprocess
import sys

from tests.train.conftest import ENV, PRETRAIN, REPO, free_port, run_train


def run_train_any(nproc: int, args: list[str], check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    if nproc > 1:  # torchrun picks its own free port
        return run_train(nproc, args, check=check, timeout=timeout)
    r = subprocess.run([sys.executable, PRETRAIN, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                       env={**ENV, "MASTER_PORT": str(free_port())})
    if check and r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r
