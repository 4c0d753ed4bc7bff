"""GPU-facing ds_config choices, checked on real DeepSpeed engines where a CPU can run them."""

import json
import subprocess
import sys

import torch

from lvm.train.ds_config import fused_adam_prebuilt, resolve
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
    raw["optimizer"]["params"]["torch_adam"] = False  # the JSON's own choice stands
    ds = resolve(raw, RunOptions(precision="fp32"), {"precision"}, 1, torch.device("cuda"))
    assert ds["optimizer"]["params"]["torch_adam"] is False and "fused" not in ds["optimizer"]["params"]
    cpu = resolve(json.loads(json.dumps(RAW)), RunOptions(precision="fp32"), {"precision"}, 1, torch.device("cpu"))
    assert cpu["optimizer"]["params"]["torch_adam"] is True and "fused" not in cpu["optimizer"]["params"]
