"""A plan applied: the concrete DeepSpeed config it gives, and the request a run's ds_config and flags make
(values they fix constrain the search; `fill_from_plan` fills what they leave to "auto")."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from lvm.plan.search import Plan, PlanError, Request, search
from lvm.plan.setting import Setting
from lvm.train.optimizers import DS_TYPES


def zero_section(s: Setting) -> dict:
    z = {"stage": s.zero_stage, "overlap_comm": s.overlap_comm, "contiguous_gradients": True,
         "reduce_bucket_size": s.reduce_bucket}
    if s.zero_stage in (1, 2):
        z["allgather_bucket_size"] = s.allgather_bucket
    if s.zero_stage == 3:
        z.update({"stage3_prefetch_bucket_size": s.prefetch_bucket, "stage3_param_persistence_threshold": s.persistence_threshold,
                  "stage3_max_live_parameters": s.max_live_parameters, "stage3_max_reuse_distance": s.max_reuse_distance})
    if s.offload_optimizer:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.offload_param:
        z["offload_param"] = {"device": "cpu", "pin_memory": True}
    return z


def ds_config(plan: Plan, base: dict | None = None) -> dict:
    """A concrete DeepSpeed config for the plan ("auto" left only where pretrain.py owns the value)."""
    s = plan.setting
    ds = copy.deepcopy(base) if base else json.loads((Path(__file__).resolve().parents[3] / "ds_configs" / "zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = s.micro_batch
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds["train_batch_size"] = "auto"
    ds["bf16"] = {"enabled": s.dtype == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": s.dtype == "fp16"}
    ds["zero_optimization"] = zero_section(s)
    section = ds.get("optimizer") or {}
    params = {k: v for k, v in (section.get("params") or {}).items() if k in ("lr", "weight_decay")}
    ds["optimizer"] = {"type": DS_TYPES[s.optimizer], "params": {"lr": "auto", "weight_decay": "auto", **params}}
    if s.offload_optimizer and s.optimizer in ("sgd", "adamw8bit"):
        ds["zero_force_ds_cpu_optimizer"] = False
    ds["lvm_plan"] = {"activation_checkpointing": s.grad_ckpt}
    return ds


def _concrete(v) -> bool:
    return v is not None and v != "auto"


def constraints_from(ds: dict, opts, given: set[str]) -> dict:
    """Setting fields a ds_config (concrete values) or explicit flags fix."""
    fixed = {}
    z = ds.get("zero_optimization") or {}
    if _concrete(z.get("stage")):
        fixed["zero_stage"] = int(z["stage"])
    for key, name in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_param")):
        if key in z and _concrete(z[key]):
            dev = z[key].get("device", "none") if isinstance(z[key], dict) else "none"
            fixed[name] = dev not in ("none", None)
    for key, name in (("reduce_bucket_size", "reduce_bucket"), ("allgather_bucket_size", "allgather_bucket"),
                      ("stage3_prefetch_bucket_size", "prefetch_bucket"), ("stage3_max_live_parameters", "max_live_parameters"),
                      ("stage3_max_reuse_distance", "max_reuse_distance"),
                      ("stage3_param_persistence_threshold", "persistence_threshold")):
        if _concrete(z.get(key)):
            fixed[name] = int(float(z[key]))
    if _concrete(z.get("overlap_comm")):
        fixed["overlap_comm"] = bool(z["overlap_comm"])
    accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
    if _concrete(accum):  # else training accumulates bf16 gradients in fp32 under ZeRO (lvm.train.ds_config)
        fixed["grad_accum_dtype"] = str(accum)
    if _concrete(ds.get("train_micro_batch_size_per_gpu")):
        fixed["micro_batch"] = int(ds["train_micro_batch_size_per_gpu"])
    elif "micro_batch" in given:
        fixed["micro_batch"] = int(opts.micro_batch)
    if "grad_ckpt" in given:
        fixed["grad_ckpt"] = bool(opts.grad_ckpt)
    elif "activation_checkpointing" in (ds.get("lvm_plan") or {}):
        fixed["grad_ckpt"] = bool(ds["lvm_plan"]["activation_checkpointing"])
    return fixed


def _plan_dtype(ds: dict, opts, device) -> str:
    for key in ("bf16", "fp16"):
        block = ds.get(key) or {}
        if block.get("enabled") is True:
            return key
    from lvm.train.ds_config import pick_precision

    return pick_precision(opts.precision, device)


def plan_request(ds: dict, opts, world_size: int, given: set[str] | None = None, device=None) -> Request:
    """The planner's request for a training run: its model, flags, ds_config constraints and job shape (GPUs per
    node from the launcher, or SLURM's variables under srun: `lvm.launch_env.procs_per_node`)."""
    import torch

    from lvm.launch_env import procs_per_node
    from lvm.model.presets import attention_implementation, model_shape
    from lvm.train.ds_config import ConfigError, optimizer_name

    given = set(given or ())
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    local = procs_per_node(world_size)
    try:
        optimizer = optimizer_name(ds, opts, given, allow_auto=True)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    fixed = constraints_from(ds, opts, given)
    dtype = _plan_dtype(ds, opts, device)
    attention = attention_implementation(getattr(opts, "attention", "auto"), device,
                                         {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32))
    return Request(model_shape(opts.model), gpus_per_node=local, nodes=world_size // local, gpu_mem_gib=opts.gpu_mem_gib,
                   seq_len=opts.seq_len, global_batch_tokens=opts.global_batch_tokens, dtype=dtype,
                   optimizer=optimizer, packing=getattr(opts, "packing", "concat"), attention=attention, fixed=fixed)


def fill_from_plan(ds: dict, opts, world_size: int, given: set[str] | None = None, device=None) -> dict:
    """For launch/pretrain.py --gpu-mem-gib: apply the whole plan (ZeRO stage, offload, buckets, ZeRO-3 live
    parameters, micro-batch, accumulation, activation checkpointing, optimizer) to the ds_config.

    Values the ds_config sets and flags the user gave are constraints; PlanError (one line) when nothing
    fits under them. Sets `opts.grad_ckpt` (and `opts.optimizer` for --optimizer auto)."""
    req = plan_request(ds, opts, world_size, given, device)
    try:
        plan = search(req)
    except PlanError as e:
        raise PlanError(f"--gpu-mem-gib {opts.gpu_mem_gib:g}: {e}") from None
    s = plan.setting
    ds = copy.deepcopy(ds)
    ds["train_micro_batch_size_per_gpu"] = s.micro_batch
    if ds.get("gradient_accumulation_steps", "auto") == "auto" and opts.global_batch_tokens:
        ds["gradient_accumulation_steps"] = plan.grad_accum
    z = dict(ds.get("zero_optimization") or {})
    for k, v in zero_section(s).items():
        if k not in ("offload_optimizer", "offload_param") and not _concrete(z.get(k)):
            z[k] = v
    for key, on in (("offload_optimizer", s.offload_optimizer), ("offload_param", s.offload_param)):
        if on and not _concrete(z.get(key)):
            z[key] = {"device": "cpu", "pin_memory": True}
        elif not on and not _concrete(z.get(key)):
            z.pop(key, None)
    ds["zero_optimization"] = {k: v for k, v in z.items() if v != "auto"}  # keys of another stage: DeepSpeed's defaults
    for key in ("bf16", "fp16"):
        block = dict(ds.get(key) or {})
        if not _concrete(block.get("enabled")):
            block["enabled"] = s.dtype == key
        ds[key] = block
    section = ds.get("optimizer") if isinstance(ds.get("optimizer"), dict) else {}
    if section.get("type", "auto") in ("auto", None):
        ds["optimizer"] = {**section, "type": DS_TYPES[s.optimizer]}
    opts.optimizer = s.optimizer
    if s.offload_optimizer and s.optimizer in ("sgd", "adamw8bit"):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    opts.grad_ckpt = s.grad_ckpt
    ds.pop("lvm_plan", None)
    return ds
