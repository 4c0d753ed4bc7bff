import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lvm.model.presets import model_shape
from lvm.plan.memory import GiB
from lvm.plan.planner import PlanError, Request, ds_config, search
from lvm.train.ds_config import resolve
from lvm.train.options import RunOptions

REPO = Path(__file__).resolve().parents[2]
PLAN = [sys.executable, str(REPO / "launch" / "plan.py")]


def test_plan_reaches_the_global_batch_and_fits(tmp_path):
    r = subprocess.run(PLAN + ["--model", "1b", "--gpus-per-node", "8", "--gpu-mem-gib", "80", "--seq-len", "4096",
                               "--global-batch-tokens", "524288", "--out", str(tmp_path / "ds.json"), "--report", str(tmp_path / "r.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    for k in ("zero_stage", "micro_batch_size", "grad_accum", "activation_checkpointing", "offload_optimizer", "offload_param"):
        assert k in rep
    b = rep["per_gpu_bytes"]
    assert set(b) >= {"params", "grads", "optimizer", "activations", "buffers", "total"}
    assert b["total"] <= 80 * GiB
    assert rep["micro_batch_size"] * rep["grad_accum"] * 8 * 4096 == 524288
    for word in ("parameters", "gradients", "optimizer states", "activations", "temporary buffers", "why:"):
        assert word in r.stdout
    # the written config is accepted by the trainer's resolver as is
    ds = json.loads((tmp_path / "ds.json").read_text())
    opts = RunOptions(seq_len=4096)
    resolve(ds, opts, set(), 8, torch.device("cpu"))
    assert opts.micro_batch == rep["micro_batch_size"] and opts.grad_accum == rep["grad_accum"]


def test_preferences_follow_the_budget():
    shape = model_shape("1b")
    roomy = search(Request(shape, 8, 1, 80, None, 4096, 524288))
    assert roomy.setting.zero_stage == 2 and not roomy.setting.grad_ckpt and not roomy.setting.offload_optimizer
    tight = search(Request(shape, 8, 1, 14, None, 4096, 524288))
    assert tight.setting.grad_ckpt or tight.setting.zero_stage == 3
    tiny_gpu = search(Request(model_shape("7b"), 1, 1, 24, 512, 4096, 4096 * 8))
    assert tiny_gpu.setting.offload_optimizer
    one_gpu = search(Request(model_shape("300m"), 1, 1, 80, None, 4096, 4096 * 4))
    assert one_gpu.setting.zero_stage == 1  # nothing to partition over on one GPU: no extra communication


def test_impossible_requests_name_the_smallest_budget():
    r = subprocess.run(PLAN + ["--model", "7b", "--gpu-mem-gib", "8", "--cpu-mem-gib", "0"], capture_output=True, text=True)
    assert r.returncode != 0 and "smallest budget" in r.stderr and "GiB per GPU" in r.stderr
    with pytest.raises(PlanError, match="not reachable"):
        search(Request(model_shape("300m"), 8, 1, 80, None, 4096, 4096 * 8 + 1))


def test_given_configuration_is_evaluated(tmp_path):
    r = subprocess.run(PLAN + ["--model", "300m", "--gpu-mem-gib", "80", "--micro-batch", "4", "--zero-stage", "3",
                               "--grad-ckpt", "on", "--report", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert (rep["zero_stage"], rep["micro_batch_size"], rep["grad_accum"], rep["activation_checkpointing"]) == (3, 4, 1, True)
    r = subprocess.run(PLAN + ["--model", "7b", "--gpu-mem-gib", "8", "--micro-batch", "8"], capture_output=True, text=True)
    assert r.returncode == 1 and "does NOT fit" in r.stdout


def test_pretrain_accepts_a_planned_config(train_shards, tmp_path):
    from tests.train.conftest import base_args, run_train

    shape = model_shape("tiny")
    plan = search(Request(shape, 1, 1, 2, None, 256, 256 * 2))
    (tmp_path / "ds.json").write_text(json.dumps(ds_config(plan)))
    args = base_args(train_shards, tmp_path / "run", "--ds_config", str(tmp_path / "ds.json"), "--max-steps", "2")
    args.remove("--micro-batch")
    args.remove("2")
    r = run_train(1, args)
    assert f"micro batch {plan.setting.micro_batch} x accumulation {plan.grad_accum}" in r.stdout


def test_pretrain_plans_auto_values_from_a_memory_budget(train_shards, tmp_path):
    from tests.train.conftest import base_args, run_train

    args = base_args(train_shards, tmp_path / "run", "--ds_config", "ds_configs/zero2.json", "--max-steps", "1",
                     "--gpu-mem-gib", "2", "--global-batch-tokens", str(256 * 4))
    args.remove("--micro-batch")
    args.remove("2")
    r = run_train(1, args)
    plan = search(Request(model_shape("tiny"), 1, 1, 2, None, 256, 256 * 4))
    assert f"micro batch {plan.setting.micro_batch} x accumulation {plan.grad_accum}" in r.stdout
