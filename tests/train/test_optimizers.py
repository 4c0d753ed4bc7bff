"""Optimizers on real DeepSpeed engines (CPU, gloo, 2 ranks): the planner's bytes against the tensors they keep."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lvm.model.presets import model_shape
from lvm.plan.model_states import model_states, optimizer_state_bytes, zero3_live_params
from lvm.plan.setting import DTYPE_BYTES, Setting
from lvm.train.ds_config import ConfigError, resolve
from lvm.train.optimizers import OptimizerError, check, make_optimizer, state_bytes_per_param
from lvm.train.options import RunOptions
from tests.train.conftest import ENV, REPO, free_port

WORKER = str(Path(__file__).with_name("optimizer_state_worker.py"))
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
TINY = model_shape("tiny")


def run_worker(cases: list[dict], out: Path, nproc: int = 2) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
           WORKER, json.dumps(cases), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return [json.loads(line) for k in range(nproc) for line in (out / f"rank{k}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    cases = [{"optimizer": o, "stage": 2, "precision": "bf16"} for o in ("adamw", "sgd", "lion")]
    cases += [{"optimizer": "adamw", "stage": 1, "precision": "fp32"}, {"optimizer": "sgd", "stage": 3, "precision": "bf16"},
              {"optimizer": "adamw", "stage": 1, "precision": "bf16"}]
    if HAVE_BNB:
        cases += [{"optimizer": "adamw8bit", "stage": 2, "precision": "bf16"}]
    # ZeRO-3 live parameters: everything partitioned (threshold 0), no prefetch, three reuse distances
    n = 1157440
    for reuse in (0, 2 * 528384 + 1, 10**9):
        cases.append({"optimizer": "adamw", "stage": 3, "precision": "fp32", "steps": 3, "live": True,
                      "extra": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                                      "stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": reuse,
                                                      "stage3_max_live_parameters": n}}})
    return run_worker(cases, tmp_path_factory.mktemp("optimizer_states"))


def test_optimizer_bytes_match_the_state_tensors(engine_results):
    """master partition + optimizer state of each rank = the planner's optimizer term (a 'step' counter aside)."""
    seen = set()
    for r in engine_results:
        if r.get("live"):
            continue
        assert r["loss_finite"] and r["world"] == 2
        s = Setting(r["stage"], 1, False, r["precision"], optimizer=r["optimizer"])
        planned = model_states(TINY, s, dp=2)[2]
        real = r["master_bytes"] + r["state_bytes"]
        if r["optimizer"] == "lion":  # on a CPU device: DeepSpeedCPULion, which also allocates exp_avg_sq
            assert r["basic"] == "DeepSpeedCPULion"
            planned = planned - optimizer_state_bytes(TINY, "lion", 2) + optimizer_state_bytes(TINY, "lion", 2, cpu_impl=True)
        assert abs(real - planned) <= 16, (r, planned)
        seen.add(r["optimizer"])
    assert seen >= {"adamw", "sgd", "lion"} | ({"adamw8bit"} if HAVE_BNB else set())


def test_gradient_bytes_match_the_engines(engine_results):
    """bf16 under ZeRO-1/2 accumulates gradients in fp32 (lvm.train.ds_config.resolve). At ZeRO-1 that is DeepSpeed's
    BF16_Optimizer: a full-size fp32 gradient buffer on every rank beside the bf16 gradients; at ZeRO-2 the ZeRO
    optimizer keeps only this rank's fp32 partition. The planner's gradient term = the bytes held when the step begins."""
    seen = set()
    for r in engine_results:
        if r["precision"] != "bf16" or r["stage"] not in (1, 2):
            continue
        planned = model_states(TINY, Setting(r["stage"], 1, False, "bf16", optimizer=r["optimizer"]), dp=2)[1]
        assert abs(r["grad_bytes"] - planned) <= 64, (r, planned)
        seen.add((r["stage"], r["optimizer_class"]))
    assert seen == {(1, "BF16_Optimizer"), (2, "DeepSpeedZeroOptimizer")}, seen


def test_state_bytes_per_parameter_follow_each_optimizer(engine_results):
    by = {r["optimizer"]: r for r in engine_results if r["stage"] == 2 and r["rank"] == 0}
    per = {k: v["state_bytes"] / (v["params"] / 2) for k, v in by.items()}
    assert round(per["adamw"], 3) == 8.0 and round(per["sgd"], 3) == 4.0
    assert state_bytes_per_param("adamw") == 8 and state_bytes_per_param("sgd") == 4 and state_bytes_per_param("lion") == 4
    if HAVE_BNB:
        assert 2.0 < per["adamw8bit"] < 2.1 and by["adamw8bit"]["basic"] == "AdamW8bit"


def test_zero3_live_parameters_follow_the_reuse_distance(engine_results):
    """Gathered parameters at the forward/backward turn (after the trace is complete) = the planner's live term."""
    live = [r for r in engine_results if r.get("live")]
    assert len(live) == 6
    got = {}
    for r in live:
        z = r["extra"]["zero_optimization"]
        s = Setting(3, 2, False, "fp32", prefetch_bucket=0, persistence_threshold=0,
                    max_reuse_distance=z["stage3_max_reuse_distance"], max_live_parameters=z["stage3_max_live_parameters"])
        assert r["live_numel"] * DTYPE_BYTES["fp32"] == zero3_live_params(TINY, s), r
        got[z["stage3_max_reuse_distance"]] = r["live_numel"]
    assert got[0] == 0 and 0 < got[2 * 528384 + 1] < got[10**9] == r["params"]


def test_client_optimizers_and_deepspeed_rules():
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(OptimizerError, match="zero_force_ds_cpu_optimizer"):
        check("sgd", ds, torch.device("cpu"))
    check("adamw", ds, torch.device("cpu"))
    check("sgd", {**ds, "zero_force_ds_cpu_optimizer": False}, torch.device("cpu"))
    with pytest.raises(OptimizerError, match="choose one of"):
        check("adam", {}, torch.device("cpu"))
    p = torch.nn.Parameter(torch.zeros(8))
    opt, out = make_optimizer("sgd", [{"params": [p], "weight_decay": 0.0}],
                              {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.1,
                                                                         "nesterov": False}}, "zero_optimization": {"stage": 2}},
                              torch.device("cpu"))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.8 and "optimizer" not in out
    assert out["zero_allow_untested_optimizer"] is True
    none, out = make_optimizer("adamw", [p], {"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, torch.device("cpu"))
    assert none is None and out["optimizer"]["type"] == "AdamW"


@pytest.mark.skipif(HAVE_BNB, reason="bitsandbytes is installed: the refusal for a missing one cannot show")
def test_adamw8bit_without_bitsandbytes_is_one_line():
    with pytest.raises(OptimizerError, match="needs bitsandbytes, which is not installed"):
        check("adamw8bit", {}, torch.device("cpu"))


def test_optimizer_flag_and_ds_config_type():
    opts = RunOptions(seq_len=64)
    opts.optimizer = "lion"
    ds = resolve({"optimizer": {"type": "auto", "params": {"eps": 1e-8, "betas": [0.9, 0.98]}}}, opts, {"optimizer"}, 1,
                 torch.device("cpu"))
    assert ds["optimizer"]["type"] == "Lion" and "eps" not in ds["optimizer"]["params"]
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.98] and "torch_adam" not in ds["optimizer"]["params"]
    opts = RunOptions(seq_len=64)
    opts.optimizer = "sgd"
    with pytest.raises(ConfigError, match="optimizer.type=AdamW but --optimizer sgd"):
        resolve({"optimizer": {"type": "AdamW"}}, opts, {"optimizer"}, 1, torch.device("cpu"))
    opts = RunOptions(seq_len=64)  # no flag: the JSON's type is adopted
    ds = resolve({"optimizer": {"type": "SGD", "params": {"momentum": 0.5}}}, opts, set(), 1, torch.device("cpu"))
    assert opts.optimizer == "sgd" and ds["optimizer"]["params"]["momentum"] == 0.5
    with pytest.raises(ConfigError, match="optimizer.type=Lamb"):
        resolve({"optimizer": {"type": "Lamb"}}, RunOptions(seq_len=64), set(), 1, torch.device("cpu"))
    opts = RunOptions(seq_len=64)  # default: AdamW with LVM's betas and torch's AdamW on CPU
    ds = resolve({}, opts, set(), 1, torch.device("cpu"))
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["optimizer"]["params"]["torch_adam"] is True
    opts = RunOptions(seq_len=64)
    opts.optimizer = "auto"
    with pytest.raises(ConfigError, match="auto needs --gpu-mem-gib"):
        resolve({}, opts, {"optimizer"}, 1, torch.device("cpu"))
