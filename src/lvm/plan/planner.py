"""Choose ZeRO stage, micro-batch, accumulation, checkpointing and offload for a memory budget.

Preference (least communication and recomputation first): no offload before offload; ZeRO-1/2
before ZeRO-3; activation checkpointing off before on; then the largest micro-batch that fits and
divides the per-GPU sequences of one optimizer step, so accumulation reaches the global batch exactly.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lvm.model.presets import ModelShape, count_parameters
from lvm.plan.memory import Breakdown, GiB, Setting, breakdown


class PlanError(ValueError):
    pass


@dataclass
class Request:
    cfg: ModelShape  # or a transformers LlamaConfig: only its size fields are read
    gpus_per_node: int = 1
    nodes: int = 1
    gpu_mem_gib: float = 80.0
    cpu_mem_gib: float | None = None
    seq_len: int = 4096
    global_batch_tokens: int | None = None
    dtype: str = "bf16"

    @property
    def dp(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass
class Plan:
    setting: Setting
    grad_accum: int
    memory: Breakdown
    reasons: list[str]
    fits: bool = True


def candidates(dp: int) -> list[tuple[int, bool, bool, bool, str]]:
    """(stage, grad_ckpt, offload_optimizer, offload_param, why) in order of preference."""
    low = 2 if dp > 1 else 1
    return [
        (low, False, False, False, f"ZeRO-{low}: optimizer{' and gradients' if low == 2 else ''} partitioned, weights replicated (least communication)"),
        (low, True, False, False, f"ZeRO-{low} fits only with activation checkpointing"),
        (3, False, False, False, "ZeRO-3: weights partitioned too (1.5x communication of ZeRO-2)"),
        (3, True, False, False, "ZeRO-3 with activation checkpointing"),
        (2, False, True, False, "ZeRO-2 with the optimizer offloaded to CPU"),
        (2, True, True, False, "ZeRO-2, optimizer offloaded to CPU, activation checkpointing"),
        (3, True, True, False, "ZeRO-3, optimizer offloaded to CPU, activation checkpointing"),
        (3, True, True, True, "ZeRO-3, optimizer and weights offloaded to CPU, activation checkpointing"),
    ]


def sequences_per_gpu(req: Request) -> int | None:
    if req.global_batch_tokens is None:
        return None
    per = req.seq_len * req.dp
    if req.global_batch_tokens % per:
        lo = req.global_batch_tokens // per * per
        raise PlanError(f"global batch of {req.global_batch_tokens} tokens is not reachable: it must be a multiple of "
                        f"seq len x data-parallel size = {req.seq_len} x {req.dp} = {per} (nearest: {lo or per} or {lo + per})")
    return req.global_batch_tokens // per


def micro_batches(per_gpu: int | None, cap: int = 64) -> list[int]:
    if per_gpu is None:
        return [m for m in (64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1) if m <= cap]
    return [m for m in range(min(per_gpu, cap), 0, -1) if per_gpu % m == 0]


def evaluate(req: Request, s: Setting) -> Breakdown:
    return breakdown(req.cfg, s, req.seq_len, req.dp, req.gpus_per_node)


def fit_buckets(req: Request, s: Setting) -> Setting:
    """Buckets no larger than the model (DeepSpeed defaults waste GBs on small models)."""
    n = count_parameters(req.cfg)
    b = int(min(200_000_000, max(n // 4, 1_000_000)))
    return replace(s, reduce_bucket=b, allgather_bucket=b, prefetch_bucket=int(min(50_000_000, b)))


def fits(req: Request, m: Breakdown) -> bool:
    if m.total > req.gpu_mem_gib * GiB:
        return False
    return req.cpu_mem_gib is None or m.cpu_per_node <= req.cpu_mem_gib * GiB


def search(req: Request) -> Plan:
    per_gpu = sequences_per_gpu(req)
    for stage, ckpt, off_opt, off_par, why in candidates(req.dp):
        if (off_opt or off_par) and req.cpu_mem_gib == 0:
            continue
        for mb in micro_batches(per_gpu):
            s = fit_buckets(req, Setting(stage, mb, ckpt, req.dtype, off_opt, off_par))
            m = evaluate(req, s)
            if fits(req, m):
                accum = per_gpu // mb if per_gpu else 1
                reasons = [why, f"micro-batch {mb}: the largest that fits" + (f" and divides {per_gpu} sequences per GPU per step" if per_gpu else ""),
                           f"gradient accumulation {accum}: {mb} x {accum} x {req.dp} GPUs x {req.seq_len} tokens = "
                           f"{mb * accum * req.dp * req.seq_len} tokens per step",
                           "activation checkpointing " + ("on: without it the activations do not fit" if ckpt else "off: the activations fit")]
                return Plan(s, accum, m, reasons)
    no_off = evaluate(req, fit_buckets(req, Setting(3, 1, True, req.dtype)))
    full_off = evaluate(req, fit_buckets(req, Setting(3, 1, True, req.dtype, True, True)))
    have = f"{req.gpu_mem_gib:g} GiB per GPU" + (f" and {req.cpu_mem_gib:g} GiB CPU per node" if req.cpu_mem_gib is not None else "")
    raise PlanError(f"nothing fits in {have}: the smallest budget is {no_off.total / GiB:.1f} GiB per GPU without offload "
                    f"(ZeRO-3, checkpointing, micro-batch 1), or {full_off.total / GiB:.1f} GiB per GPU with "
                    f"{full_off.cpu_per_node / GiB:.1f} GiB CPU per node (weights and optimizer offloaded)")


def evaluate_given(req: Request, stage: int, micro_batch: int, grad_ckpt: bool, off_opt=False, off_par=False) -> Plan:
    per_gpu = sequences_per_gpu(req)
    if per_gpu is not None and per_gpu % micro_batch:
        raise PlanError(f"micro-batch {micro_batch} does not divide the {per_gpu} sequences per GPU per step")
    s = fit_buckets(req, Setting(stage, micro_batch, grad_ckpt, req.dtype, off_opt, off_par))
    m = evaluate(req, s)
    accum = per_gpu // micro_batch if per_gpu else 1
    ok = fits(req, m)
    return Plan(s, accum, m, [f"evaluated as given: ZeRO-{stage}, micro-batch {micro_batch}, checkpointing {'on' if grad_ckpt else 'off'}",
                              "fits the budget" if ok else "does NOT fit the budget"], fits=ok)


def ds_config(plan: Plan, base: dict | None = None) -> dict:
    """A concrete DeepSpeed config for the plan ("auto" left only where pretrain.py owns the value)."""
    s = plan.setting
    ds = copy.deepcopy(base) if base else json.loads((Path(__file__).resolve().parents[3] / "ds_configs" / "zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = s.micro_batch
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds["train_batch_size"] = "auto"
    ds["bf16"] = {"enabled": s.dtype == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": s.dtype == "fp16"}
    z = {"stage": s.zero_stage, "overlap_comm": s.overlap_comm, "contiguous_gradients": True,
         "reduce_bucket_size": s.reduce_bucket}
    if s.zero_stage in (1, 2):
        z["allgather_bucket_size"] = s.allgather_bucket
    if s.zero_stage == 3:
        z.update({"stage3_prefetch_bucket_size": s.prefetch_bucket, "stage3_param_persistence_threshold": 100_000,
                  "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000})
    if s.offload_optimizer:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.offload_param:
        z["offload_param"] = {"device": "cpu", "pin_memory": True}
    ds["zero_optimization"] = z
    ds["lvm_plan"] = {"activation_checkpointing": s.grad_ckpt}
    return ds


def report(plan: Plan, req: Request) -> dict:
    s, m = plan.setting, plan.memory
    return {"zero_stage": s.zero_stage, "micro_batch_size": s.micro_batch, "grad_accum": plan.grad_accum,
            "activation_checkpointing": s.grad_ckpt, "offload_optimizer": s.offload_optimizer, "offload_param": s.offload_param,
            "fits": plan.fits, "dtype": s.dtype,
            "per_gpu_bytes": {"params": m.params, "grads": m.grads, "optimizer": m.optimizer, "activations": m.activations,
                              "buffers": m.buffers, "reserve": m.reserve, "total": m.total},
            "cpu_bytes_per_node": m.cpu_per_node, "budget_bytes": int(req.gpu_mem_gib * GiB),
            "parameters": count_parameters(req.cfg), "data_parallel": req.dp, "seq_len": req.seq_len,
            "reasons": plan.reasons, "setting": asdict(s)}


def table(plan: Plan, req: Request) -> str:
    m = plan.memory
    g = lambda b: f"{b / GiB:8.2f} GiB"
    rows = [("parameters", m.params), ("gradients", m.grads), ("optimizer states", m.optimizer),
            ("activations", m.activations), ("temporary buffers", m.buffers), ("CUDA context + fragmentation", m.reserve)]
    out = [f"per GPU ({req.gpus_per_node} GPUs x {req.nodes} nodes, {count_parameters(req.cfg) / 1e6:,.1f}M parameters, "
           f"seq {req.seq_len}, {plan.setting.dtype})", "-" * 44]
    out += [f"{name:<30}{g(v)}" for name, v in rows]
    out += ["-" * 44, f"{'total':<30}{g(m.total)}", f"{'budget':<30}{g(req.gpu_mem_gib * GiB)}"]
    if m.cpu_per_node:
        out += [f"{'CPU per node (offload)':<30}{g(m.cpu_per_node)}"
                + (f" of {req.cpu_mem_gib:g} GiB" if req.cpu_mem_gib is not None else "")]
    out += ["", "why:"] + [f"  - {r}" for r in plan.reasons]
    return "\n".join(out)


def fill_from_plan(ds: dict, opts, world_size: int) -> dict:
    """For launch/pretrain.py --gpu-mem-gib: plan the values the ds_config leaves "auto"."""
    from lvm.model.presets import model_shape

    req = Request(model_shape(opts.model), gpus_per_node=world_size, nodes=1, gpu_mem_gib=opts.gpu_mem_gib,
                  seq_len=opts.seq_len, global_batch_tokens=opts.global_batch_tokens)
    plan = search(req)
    ds = copy.deepcopy(ds)
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = plan.setting.micro_batch
    if ds.get("gradient_accumulation_steps", "auto") == "auto" and opts.global_batch_tokens:
        ds["gradient_accumulation_steps"] = plan.grad_accum
    if plan.setting.grad_ckpt:
        opts.grad_ckpt = True
    return ds
