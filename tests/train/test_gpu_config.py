"""GPU-facing ds_config choices, checked on real DeepSpeed engines where a CPU can run them."""

import json
import subprocess
import sys

import pytest
import torch

from lvm.train.ds_config import ConfigError, fused_adam_prebuilt, resolve
from lvm.train.optimizers import cuda_op_needed, cuda_op_unavailable
from lvm.train.options import RunOptions
from tests.train.conftest import ENV, REPO, free_port

RAW = json.loads((REPO / "ds_configs" / "zero2.json").read_text())


def test_bf16_under_zero_accumulates_gradients_in_fp32():
    """ZeRO-1/2/3 engines built from the resolved config accumulate in fp32; a dtype the JSON names is kept."""
    r = subprocess.run([sys.executable, "tests/train/grad_accum_worker.py", "1", "2", "3"], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env={**ENV, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                                                   "PYTHONPATH": str(REPO)})
    rows = [json.loads(x[len("RESULT "):]) for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and len(rows) == 4, r.stderr[-3000:]
    for row in rows[:3]:
        assert row["config"] == "fp32" and row["weights"] == "torch.bfloat16" and row["accum"] == "torch.float32", row
    assert rows[3]["json"] == "bf16" and rows[3]["accum"] == "torch.bfloat16"  # the JSON's choice, and the control


def test_no_fp32_accumulation_forced_where_deepspeed_cannot_take_it():
    for precision, stage in (("fp32", 2), ("bf16", 0)):  # fp32 needs none; stage 0 bf16 supports bf16 only
        raw = json.loads(json.dumps(RAW))
        raw["zero_optimization"]["stage"] = stage
        ds = resolve(raw, RunOptions(precision=precision), {"precision"}, 1, torch.device("cpu"))
        assert "data_types" not in ds


def test_adamw_on_cuda_uses_a_prebuilt_fused_kernel():
    """No JIT build of DeepSpeed's FusedAdam at start-up (it needs nvcc): torch's fused AdamW unless the op ships built."""
    ds = resolve(json.loads(json.dumps(RAW)), RunOptions(precision="fp32"), {"precision"}, 1, torch.device("cuda"))
    params = ds["optimizer"]["params"]
    if fused_adam_prebuilt():
        assert "torch_adam" not in params
    else:
        assert params["torch_adam"] is True and params["fused"] is True
    raw = json.loads(json.dumps(RAW))
    raw["optimizer"]["params"]["torch_adam"] = False  # the JSON's own choice stands where FusedAdam can load
    if cuda_op_unavailable("fused_adam") is None:
        ds = resolve(raw, RunOptions(precision="fp32"), {"precision"}, 1, torch.device("cuda"))
        assert ds["optimizer"]["params"]["torch_adam"] is False and "fused" not in ds["optimizer"]["params"]
    else:
        with pytest.raises(ConfigError, match=r"DeepSpeed's fused_adam op, which is not prebuilt .*torch_adam"):
            resolve(raw, RunOptions(precision="fp32"), {"precision"}, 1, torch.device("cuda"))
    cpu = resolve(json.loads(json.dumps(RAW)), RunOptions(precision="fp32"), {"precision"}, 1, torch.device("cpu"))
    assert cpu["optimizer"]["params"]["torch_adam"] is True and "fused" not in cpu["optimizer"]["params"]


def test_a_cuda_op_that_cannot_be_built_is_one_line_before_any_compute():
    """Lion on a GPU is DeepSpeed's FusedLion, JIT-compiled with nvcc at deepspeed.initialize unless prebuilt: where
    it can be neither, the run stops at config time with one line (here: a CPU torch, so no CUDA toolkit for it)."""
    raw = json.loads(json.dumps(RAW))
    opts = RunOptions(precision="fp32", optimizer="lion")
    why = cuda_op_unavailable("fused_lion")
    if why is None:
        pytest.skip("this machine can build DeepSpeed's fused_lion op")
    with pytest.raises(ConfigError) as e:
        resolve(raw, opts, {"precision", "optimizer"}, 1, torch.device("cuda"))
    msg = str(e.value)
    assert "\n" not in msg and "fused_lion" in msg and why in msg and "DS_BUILD_FUSED_LION=1" in msg
    # the same optimizer where it needs no CUDA op: on the CPU, and under ZeRO-Offload (DeepSpeedCPULion)
    resolve(json.loads(json.dumps(RAW)), RunOptions(precision="fp32", optimizer="lion"), {"optimizer"}, 1, torch.device("cpu"))
    off = json.loads(json.dumps(RAW))
    off["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    resolve(off, RunOptions(precision="fp32", optimizer="lion"), {"precision", "optimizer"}, 1, torch.device("cuda"))
    assert cuda_op_needed("adamw", {"optimizer": {"params": {"torch_adam": True}}}, torch.device("cuda")) is None
    assert cuda_op_needed("adamw", {"optimizer": {"params": {}}}, torch.device("cuda:1")) == "fused_adam"
