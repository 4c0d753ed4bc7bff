"""bench/bench_plan.py --gpu measures the engine training builds: the same resolved ds_config, the same inputs."""

import json
import subprocess
import sys

import pytest
import torch

from tests.train.conftest import ENV, REPO, free_port

sys.path.insert(0, str(REPO / "bench"))
import bench_plan  # noqa: E402

from lvm.train.ds_config import fused_adam_prebuilt  # noqa: E402


@pytest.mark.parametrize("stage", [2, 3])
def test_the_measured_engine_is_configured_as_training_configures_it(monkeypatch, stage):
    """On a bf16 GPU: gradients accumulate in fp32 under ZeRO (as lvm.train.ds_config.resolve sets for training) and
    AdamW is torch's fused AdamW unless FusedAdam ships prebuilt (no nvcc build in the middle of a measurement)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # an H100's answer, on this CPU
    case = {"stage": stage, "ckpt": True, "micro_batch": 2, "packing": "sentence", "attention": "sdpa"}
    plan = bench_plan.planned(case, "300m", 4096)
    ds = bench_plan.training_ds_config(plan, 4096, torch.device("cuda"))
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["zero_optimization"]["stage"] == stage and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["train_batch_size"] == 2 and ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 1.0
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW" and params["betas"] == [0.9, 0.95]
    if not fused_adam_prebuilt():
        assert params["torch_adam"] is True and params["fused"] is True
    assert "lvm_plan" not in ds and "auto" not in json.dumps(ds)


@pytest.mark.slow
def test_measurement_runs_end_to_end_on_a_cpu(tmp_path):
    """The GPU measurement's code path (real DeepSpeed engine, the trainer's packed-attention arguments) on the CPU."""
    code = ("import json, sys; sys.path.insert(0, 'bench'); import bench_plan\n"
            "for case in ({'stage': 2, 'ckpt': False, 'micro_batch': 2, 'packing': 'sentence'},\n"
            "             {'stage': 3, 'ckpt': True, 'micro_batch': 2, 'packing': 'concat'}):\n"
            "    print('RESULT ' + json.dumps(bench_plan.measure_one(case, 'tiny', 64, 'cpu')), flush=True)\n")
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    rows = [json.loads(x[len("RESULT "):]) for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and len(rows) == 2, r.stderr[-3000:]
    for row in rows:
        assert row["loss"] == row["loss"] and 8.0 < row["loss"] < 10.5  # finite, near ln(8256) at the start
        assert row["attention"] == "sdpa" and row["planned_allocated"] > 0
