"""A tiny trained run and its Hugging Face export, made once for every evaluation test."""

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.train.conftest import ENV, base_args, run_train


@pytest.fixture(scope="session")
def trained(train_shards, tmp_path_factory):
    """(run folder, exported HF folder) of 4 ZeRO-2 steps on the shared small shards, 2048-token window."""
    run = tmp_path_factory.mktemp("evalrun") / "run"
    run_train(1, base_args(train_shards, run, "--ds_config", "ds_configs/zero2.json", "--max-steps", "4",
                           "--save-every", "4", "--seq-len", "2048"))
    hf = run.parent / "hf"
    subprocess.run([sys.executable, "launch/export_hf.py", "--checkpoint", str(run), "--out", str(hf)], check=True,
                   cwd=REPO, env=ENV, capture_output=True)
    return run, hf


def cli(script, *args):
    return subprocess.run([sys.executable, f"launch/{script}", *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True)
