import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lvm.model.presets import model_shape
from lvm.plan.apply import ds_config
from lvm.plan.search import PlanError, Request, search
from lvm.plan.setting import GiB
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
    for word in ("parameters", "gradients", "optimizer states (adamw)", "ZeRO-3 live parameters", "activations",
                 "attention mask (sentence packing)", "backward peak", "communication buckets", "cuBLAS workspaces",
                 "fragmentation (expandable_segments", "CUDA context", "NCCL buffers", "why:"):
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
    from tests.train.conftest import base_args

    shape = model_shape("tiny")
    plan = search(Request(shape, 1, 1, 2, None, 256, 256 * 2))
    (tmp_path / "ds.json").write_text(json.dumps(ds_config(plan)))
    args = base_args(train_shards, tmp_path / "run", "--ds_config", str(tmp_path / "ds.json"), "--max-steps", "3")
    args.remove("--micro-batch")
    args.remove("2")
    r = run_train(1, args)
    assert f"micro batch {plan.setting.micro_batch} x accumulation {plan.grad_accum}" in r.stdout


def run_train(nproc: int, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """One pretrain.py process on a free port (the default 29500 may be taken by another run on this machine)."""
    from tests.train.conftest import ENV, train_cmd
    from tests.train.conftest import free_port as port

    assert nproc == 1
    r = subprocess.run(train_cmd(1, args), capture_output=True, text=True, env={**ENV, "MASTER_PORT": str(port())}, cwd=REPO,
                       timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def auto_ds_config(path: Path, **zero) -> str:
    """A ds_config that leaves the plan to --gpu-mem-gib (stage, buckets, micro-batch, accumulation all "auto")."""
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["zero_optimization"] = {"stage": "auto", "reduce_bucket_size": "auto", "allgather_bucket_size": "auto", **zero}
    path.write_text(json.dumps(ds))
    return str(path)


def test_pretrain_applies_the_whole_plan(train_shards, tmp_path):
    """--gpu-mem-gib sets ZeRO stage, buckets, micro-batch, accumulation and checkpointing, and the run trains with them."""
    from tests.train.conftest import base_args

    cfg_path = auto_ds_config(tmp_path / "ds.json", stage=3)
    req = Request(model_shape("tiny"), 1, 1, 1.0, None, 256, 256 * 4, "fp32", fixed={"zero_stage": 3})
    plan = search(req)
    args = base_args(train_shards, tmp_path / "run", "--ds_config", cfg_path, "--max-steps", "3",
                     "--gpu-mem-gib", "1", "--global-batch-tokens", str(256 * 4))
    args.remove("--micro-batch")
    args.remove("2")
    r = run_train(1, args)
    assert f"ZeRO-3, fp32, world 1, micro batch {plan.setting.micro_batch} x accumulation {plan.grad_accum}" in r.stdout
    ds = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    z = ds["zero_optimization"]
    s = plan.setting
    assert (z["stage"], z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_max_reuse_distance"]) == \
        (3, s.reduce_bucket, s.prefetch_bucket, s.max_reuse_distance)
    assert "offload_optimizer" not in z and ds["train_micro_batch_size_per_gpu"] == s.micro_batch
    assert json.loads((tmp_path / "run" / "options.json").read_text())["grad_ckpt"] == s.grad_ckpt


def test_pretrain_plans_within_what_the_ds_config_fixes(train_shards, tmp_path):
    from tests.train.conftest import base_args

    cfg_path = auto_ds_config(tmp_path / "ds.json", stage=2)
    args = base_args(train_shards, tmp_path / "run", "--ds_config", cfg_path, "--max-steps", "3",
                     "--gpu-mem-gib", "2", "--global-batch-tokens", str(256 * 4))
    args.remove("--micro-batch")
    args.remove("2")
    r = run_train(1, args)
    plan = search(Request(model_shape("tiny"), 1, 1, 2, None, 256, 256 * 4, "fp32", fixed={"zero_stage": 2}))
    assert plan.setting.zero_stage == 2
    assert f"ZeRO-2, fp32, world 1, micro batch {plan.setting.micro_batch} x accumulation {plan.grad_accum}" in r.stdout


def test_pretrain_refuses_a_ds_config_that_contradicts_the_plan(train_shards, tmp_path):
    """ds_configs/zero2.json fixes 200M-element buckets: 2.2 GiB of fp32 buckets cannot fit a 2 GiB budget."""
    from tests.train.conftest import base_args

    args = base_args(train_shards, tmp_path / "run", "--ds_config", "ds_configs/zero2.json", "--max-steps", "3",
                     "--gpu-mem-gib", "2", "--global-batch-tokens", str(256 * 4))
    r = run_train(1, args, check=False)
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1, r.stderr[-2000:]
    assert "nothing fits in 2 GiB per GPU under zero_optimization.stage=2, reduce_bucket_size=200000000" in err[0]
    assert "without those the plan is ZeRO-" in err[0] and '"auto"' in err[0]
    assert "step 1" not in r.stdout and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_fill_from_plan_respects_flags_and_json():
    from lvm.plan.apply import fill_from_plan

    base = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    base["bf16"] = {"enabled": True}  # planned for a bf16 GPU (this machine has none to ask)
    opts = RunOptions(model="300m", seq_len=4096, gpu_mem_gib=40, global_batch_tokens=4096 * 8 * 16, grad_ckpt=False)
    ds = fill_from_plan(base, opts, 8, given={"gpu_mem_gib", "global_batch_tokens"}, device=torch.device("cuda"))
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == base["zero_optimization"]["reduce_bucket_size"]
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] == 16 and ds["bf16"]["enabled"] is True
    # an explicit --no-grad-ckpt is a constraint, not something the plan overrides
    tight = RunOptions(model="1b", seq_len=4096, gpu_mem_gib=12, global_batch_tokens=4096 * 8 * 8, grad_ckpt=False)
    with pytest.raises(PlanError, match="activation checkpointing=False"):
        fill_from_plan(base, tight, 8, given={"gpu_mem_gib", "global_batch_tokens", "grad_ckpt"}, device=torch.device("cuda"))
    tight.grad_ckpt = False
    ds = fill_from_plan(base, tight, 8, given={"gpu_mem_gib", "global_batch_tokens"}, device=torch.device("cuda"))
    assert tight.grad_ckpt is True and ds["zero_optimization"]["stage"] == 3


def test_plot_optimizer_auto_and_gpu_terms_in_the_report(tmp_path):
    """3b on one 48 GiB GPU: AdamW needs CPU offload, 8-bit AdamW does not, so auto picks it and says why."""
    r = subprocess.run(PLAN + ["--model", "3b", "--gpu-mem-gib", "48", "--global-batch-tokens", str(4096 * 8), "--optimizer", "auto",
                               "--packing", "sentence", "--attention", "sdpa", "--report", str(tmp_path / "r.json"),
                               "--plot", str(tmp_path / "plan.png"), "--out", str(tmp_path / "ds.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["optimizer"] == "adamw8bit" and not rep["offload_optimizer"]
    assert any("AdamW needs CPU offload" in x for x in rep["reasons"])
    adamw = search(Request(model_shape("3b"), 1, 1, 48, None, 4096, 4096 * 8, optimizer="adamw", packing="sentence"))
    assert adamw.setting.offload_optimizer
    b = rep["per_gpu_bytes"]
    assert b["attention_mask"] > 0 and b["cuda_context"] > 0 and b["cublas_workspace"] > 0 and b["fragmentation"] > 0
    assert b["total"] == b["allocated"] + b["fragmentation"] + b["cuda_context"] + b["nccl"] <= 48 * GiB
    assert json.loads((tmp_path / "ds.json").read_text())["optimizer"]["type"] == "AdamW8bit"
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "plan.png")
    assert img.shape[0] > 300 and img.shape[1] > 600


def test_terms_follow_their_switches():
    shape = model_shape("1b")
    base = dict(cfg=shape, gpus_per_node=8, gpu_mem_gib=80, seq_len=4096, global_batch_tokens=4096 * 8 * 4)
    sdpa = search(Request(**base, packing="sentence", attention="sdpa", fixed={"micro_batch": 2, "grad_ckpt": False}))
    flash = search(Request(**base, packing="sentence", attention="flash_attention_2", fixed={"micro_batch": 2, "grad_ckpt": False}))
    mask = 2 * 4096 * 4096 * 2  # one additive mask, shared by all layers (+ RoPE per sequence)
    assert mask <= sdpa.memory.attention_mask < 1.05 * mask and flash.memory.attention_mask == 0
    on = search(Request(**base, expandable_segments=True))
    off = search(Request(**base, expandable_segments=False))
    assert on.memory.fragmentation < off.memory.fragmentation / 4
    one_gpu = search(Request(model_shape("300m"), 1, 1, 80, None, 4096, 4096 * 4))
    assert one_gpu.memory.nccl == 0 and on.memory.nccl > 100 * 2**20
    z3 = search(Request(**base, fixed={"zero_stage": 3}))
    z3_release = search(Request(**base, fixed={"zero_stage": 3, "max_reuse_distance": 0}))
    assert z3.memory.live_params > z3_release.memory.live_params  # 1b: the last ~500M parameters stay gathered
    small = {o: search(Request(**base, optimizer=o, fixed={"zero_stage": 2, "micro_batch": 1})).memory.optimizer
             for o in ("adamw", "adamw8bit", "sgd", "lion")}
    assert small["adamw"] > small["sgd"] == small["lion"] > small["adamw8bit"]


def test_plan_cli_errors_are_one_line(tmp_path):
    for extra, msg in ((["--plot", str(tmp_path / "x.jpg")], "give a .png path"),
                       (["--optimizer", "auto", "--micro-batch", "2"], "needs a concrete optimizer"),
                       (["--micro-batch", "2", "--offload", "all"], "--offload all needs --zero-stage 3")):
        r = subprocess.run(PLAN + ["--model", "300m", "--gpu-mem-gib", "80", *extra], capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_fill_from_plan_reads_the_nodes_of_an_srun_job(monkeypatch):
    """Under srun there is no LOCAL_WORLD_SIZE: the nodes come from SLURM's variables, so CPU-offload bytes are per node."""
    from lvm.plan.apply import plan_request

    base = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    base["bf16"] = {"enabled": True}
    opts = RunOptions(model="3b", seq_len=4096, gpu_mem_gib=12, global_batch_tokens=4096 * 32)  # ZeRO-2 needs offload
    for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "32")
    monkeypatch.setenv("SLURM_NNODES", "4")
    req = plan_request(base, opts, 32, {"gpu_mem_gib", "global_batch_tokens"}, torch.device("cuda"))
    assert (req.gpus_per_node, req.nodes) == (8, 4)
    plan = search(req)
    one_node = search(replace(req, gpus_per_node=32, nodes=1))
    assert plan.setting.offload_optimizer and plan.setting == one_node.setting
    assert plan.memory.cpu_per_node == pytest.approx(one_node.memory.cpu_per_node / 4, rel=1e-6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's own variable wins
    assert plan_request(base, opts, 32, {"gpu_mem_gib"}, torch.device("cuda")).nodes == 8
