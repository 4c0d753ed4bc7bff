"""Choose ZeRO stage, offload, buckets, micro-batch, accumulation, checkpointing and optimizer for a memory budget.

Preference (least communication and recomputation first): no offload before offload; ZeRO-1/2
before ZeRO-3; activation checkpointing off before on; then the largest micro-batch that fits and
divides the per-GPU sequences of one optimizer step, so accumulation reaches the global batch exactly.
Under ZeRO-3, gathered parameters are kept from forward to backward (DeepSpeed's default reuse
distance) before they are released after use (reuse distance 0: one more all-gather per step).

Values a ds_config fixes (stage, offload, buckets, ZeRO-3 live/reuse limits, micro-batch, precision)
and flags the user gave (--micro-batch, --grad-ckpt) constrain the search instead of being
overwritten; when nothing fits under them the planner refuses in one line and says what would fit.

`--optimizer auto` keeps AdamW (LVM's optimizer) unless AdamW needs CPU offload while 8-bit AdamW
fits without it: offload costs step time on every step, 8-bit states (2 B instead of 8 B per
parameter) matched 32-bit Adam in Dettmers et al. (2022). SGD and Lion are never chosen for you:
SGD trains transformers poorly and Lion needs its own learning rate.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lvm.model.presets import ModelShape, count_parameters
from lvm.plan.memory import DS_DEFAULT_LIVE, Breakdown, GiB, Setting, breakdown, expandable_segments_from_env
from lvm.train.optimizers import DS_TYPES, OPTIMIZERS


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
    optimizer: str = "adamw"          # or "auto"
    packing: str = "concat"
    attention: str = "sdpa"           # or "flash_attention_2" (varlen: no mask for sentence packing)
    expandable_segments: bool | None = None  # None: read PYTORCH_CUDA_ALLOC_CONF
    fixed: dict = field(default_factory=dict)  # Setting fields the ds_config or the flags fix

    @property
    def dp(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def attn_mask(self) -> bool:
        return self.packing == "sentence" and self.attention != "flash_attention_2"

    @property
    def expandable(self) -> bool:
        return expandable_segments_from_env() if self.expandable_segments is None else self.expandable_segments


@dataclass
class Plan:
    setting: Setting
    grad_accum: int
    memory: Breakdown
    reasons: list[str]
    fits: bool = True


OFFLOAD_WHY = {(False, False): "", (True, False): ", optimizer offloaded to CPU", (True, True): ", optimizer and weights offloaded to CPU"}


def candidates(dp: int, stage: int | None = None) -> list[tuple[int, bool, bool, bool, str]]:
    """(stage, grad_ckpt, offload_optimizer, offload_param, why) in order of preference."""
    low = 2 if dp > 1 else 1
    if stage is None:
        order = [(low, False, False, False), (low, True, False, False), (3, False, False, False), (3, True, False, False),
                 (2, False, True, False), (2, True, True, False), (3, True, True, False), (3, True, True, True)]
    elif stage in (1, 2):
        order = [(stage, False, False, False), (stage, True, False, False), (stage, False, True, False), (stage, True, True, False)]
    elif stage == 3:
        order = [(3, False, False, False), (3, True, False, False), (3, False, True, False), (3, True, True, False),
                 (3, True, True, True)]
    else:
        order = [(0, False, False, False), (0, True, False, False)]
    out = []
    for st, ckpt, oo, op in order:
        what = {0: "no ZeRO: everything replicated",
                1: "optimizer states partitioned, weights and gradients replicated",
                2: "optimizer and gradients partitioned, weights replicated (least communication)",
                3: "weights partitioned too (1.5x communication of ZeRO-2)"}[st]
        out.append((st, ckpt, oo, op, f"ZeRO-{st}: {what}{OFFLOAD_WHY[(oo, op)]}"
                    + (", activation checkpointing" if ckpt else "")))
    return out


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
    """Buckets no larger than the model (DeepSpeed defaults waste GBs on small models), unless fixed."""
    n = count_parameters(req.cfg)
    b = int(min(200_000_000, max(n // 4, 1_000_000)))
    s = replace(s, reduce_bucket=b, allgather_bucket=b, prefetch_bucket=int(min(50_000_000, b)))
    return replace(s, **{k: v for k, v in req.fixed.items() if k in ("reduce_bucket", "allgather_bucket", "prefetch_bucket",
                                                                      "overlap_comm", "max_live_parameters",
                                                                      "max_reuse_distance", "persistence_threshold")})


def fits(req: Request, m: Breakdown) -> bool:
    if m.total > req.gpu_mem_gib * GiB:
        return False
    return req.cpu_mem_gib is None or m.cpu_per_node <= req.cpu_mem_gib * GiB


def _setting(req: Request, stage, mb, ckpt, off_opt, off_par, optimizer, reuse=None) -> Setting:
    s = Setting(stage, mb, ckpt, req.dtype, off_opt, off_par, optimizer=optimizer, attn_mask=req.attn_mask,
                expandable_segments=req.expandable, grad_accum_dtype=req.fixed.get("grad_accum_dtype", "auto"))
    s = fit_buckets(req, s)
    if reuse is not None:
        s = replace(s, max_reuse_distance=reuse)
    return s


def _search(req: Request, optimizer: str, allow_offload: bool = True) -> Plan | None:
    per_gpu = sequences_per_gpu(req)
    fx = req.fixed
    for stage, ckpt, off_opt, off_par, why in candidates(req.dp, fx.get("zero_stage")):
        if (off_opt or off_par) and (req.cpu_mem_gib == 0 or not allow_offload):
            continue
        if any(k in fx and fx[k] != v for k, v in (("grad_ckpt", ckpt), ("offload_optimizer", off_opt), ("offload_param", off_par))):
            continue
        mbs = [fx["micro_batch"]] if "micro_batch" in fx else micro_batches(per_gpu)
        if per_gpu is not None and "micro_batch" in fx and per_gpu % fx["micro_batch"]:
            raise PlanError(f"micro-batch {fx['micro_batch']} does not divide the {per_gpu} sequences per GPU per step")
        reuses = [None] if stage != 3 or "max_reuse_distance" in fx else [DS_DEFAULT_LIVE, 0]
        for mb in mbs:
            for reuse in reuses:
                s = _setting(req, stage, mb, ckpt, off_opt, off_par, optimizer, reuse)
                m = evaluate(req, s)
                if fits(req, m):
                    accum = per_gpu // mb if per_gpu else 1
                    reasons = [why,
                               f"micro-batch {mb}: " + ("as given" if "micro_batch" in fx else "the largest that fits"
                                                         + (f" and divides {per_gpu} sequences per GPU per step" if per_gpu else "")),
                               f"gradient accumulation {accum}: {mb} x {accum} x {req.dp} GPUs x {req.seq_len} tokens = "
                               f"{mb * accum * req.dp * req.seq_len} tokens per step",
                               "activation checkpointing " + ("as given" if "grad_ckpt" in fx else
                                                              "on: without it the activations do not fit" if ckpt else "off: the activations fit")]
                    if stage == 3:
                        reasons.append("ZeRO-3 keeps gathered weights from forward to backward (stage3_max_reuse_distance "
                                       f"{s.max_reuse_distance:.0e})" if s.max_reuse_distance else
                                       "ZeRO-3 releases weights after use (stage3_max_reuse_distance 0): keeping them "
                                       "until backward does not fit")
                    return Plan(s, accum, m, reasons)
    return None


def _smallest(req: Request, optimizer: str) -> str:
    no_off = evaluate(req, _setting(req, 3, 1, True, False, False, optimizer, 0))
    full_off = evaluate(req, _setting(req, 3, 1, True, True, True, optimizer, 0))
    return (f"the smallest budget is {no_off.total / GiB:.1f} GiB per GPU without offload (ZeRO-3, checkpointing, "
            f"micro-batch 1), or {full_off.total / GiB:.1f} GiB per GPU with {full_off.cpu_per_node / GiB:.1f} GiB CPU per "
            "node (weights and optimizer offloaded)")


def _have(req: Request) -> str:
    return f"{req.gpu_mem_gib:g} GiB per GPU" + (f" and {req.cpu_mem_gib:g} GiB CPU per node" if req.cpu_mem_gib is not None else "")


def describe_fixed(fixed: dict) -> str:
    names = {"zero_stage": "zero_optimization.stage", "offload_optimizer": "offload_optimizer", "offload_param": "offload_param",
             "micro_batch": "micro-batch", "grad_ckpt": "activation checkpointing", "reduce_bucket": "reduce_bucket_size",
             "allgather_bucket": "allgather_bucket_size", "prefetch_bucket": "stage3_prefetch_bucket_size",
             "max_live_parameters": "stage3_max_live_parameters", "max_reuse_distance": "stage3_max_reuse_distance",
             "persistence_threshold": "stage3_param_persistence_threshold", "overlap_comm": "overlap_comm",
             "grad_accum_dtype": "data_types.grad_accum_dtype"}
    return ", ".join(f"{names.get(k, k)}={v}" for k, v in fixed.items())


def summary(plan: Plan) -> str:
    s = plan.setting
    off = " + optimizer offload" if s.offload_optimizer else ""
    off += " + weight offload" if s.offload_param else ""
    return (f"ZeRO-{s.zero_stage}{off}, micro-batch {s.micro_batch} x accumulation {plan.grad_accum}, "
            f"checkpointing {'on' if s.grad_ckpt else 'off'}, {s.optimizer}")


def search(req: Request) -> Plan:
    if req.optimizer not in (*OPTIMIZERS, "auto"):
        raise PlanError(f"--optimizer {req.optimizer!r}: choose one of {', '.join(OPTIMIZERS)} or auto")
    if req.optimizer == "auto":
        plan = _search(req, "adamw")
        if plan is not None and not plan.setting.offload_optimizer:
            plan.reasons.append("optimizer adamw (auto): LVM's optimizer, and it fits without CPU offload")
            return plan
        small = _search(req, "adamw8bit", allow_offload=plan is not None)
        if small is not None and (plan is None or not small.setting.offload_optimizer):
            small.reasons.append("optimizer adamw8bit (auto): " + ("AdamW needs CPU offload here; " if plan else "AdamW does not fit; ")
                                 + "8-bit states (2 B instead of 8 B per parameter) fit "
                                 + ("without it" if not small.setting.offload_optimizer else "")
                                 + " (Dettmers et al. 2022: 8-bit AdamW matches 32-bit AdamW)")
            return small
        if plan is not None:
            plan.reasons.append("optimizer adamw (auto): 8-bit AdamW would need the offload too, so LVM's optimizer stays")
            return plan
        optimizer = "adamw"
    else:
        optimizer = req.optimizer
        plan = _search(req, optimizer)
        if plan is not None:
            plan.reasons.append(f"optimizer {optimizer}: as asked")
            return plan
    if req.fixed:
        free = _search(replace(req, fixed={}), optimizer)
        if free is not None:
            raise PlanError(f"nothing fits in {_have(req)} under {describe_fixed(req.fixed)}; without those the plan is "
                            f"{summary(free)}: set them to \"auto\" in the ds_config (or drop the flags), or raise the budget")
    raise PlanError(f"nothing fits in {_have(req)}: {_smallest(req, optimizer)}")


def evaluate_given(req: Request, stage: int, micro_batch: int, grad_ckpt: bool, off_opt=False, off_par=False) -> Plan:
    if req.optimizer not in OPTIMIZERS:
        raise PlanError(f"--optimizer {req.optimizer}: evaluating one configuration needs a concrete optimizer "
                        f"({', '.join(OPTIMIZERS)})")
    per_gpu = sequences_per_gpu(req)
    if per_gpu is not None and per_gpu % micro_batch:
        raise PlanError(f"micro-batch {micro_batch} does not divide the {per_gpu} sequences per GPU per step")
    s = _setting(req, stage, micro_batch, grad_ckpt, off_opt, off_par, req.optimizer)
    m = evaluate(req, s)
    accum = per_gpu // micro_batch if per_gpu else 1
    ok = fits(req, m)
    return Plan(s, accum, m, [f"evaluated as given: ZeRO-{stage}, micro-batch {micro_batch}, checkpointing "
                              f"{'on' if grad_ckpt else 'off'}, {req.optimizer}",
                              "fits the budget" if ok else "does NOT fit the budget"], fits=ok)


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


def report(plan: Plan, req: Request) -> dict:
    s, m = plan.setting, plan.memory
    return {"zero_stage": s.zero_stage, "micro_batch_size": s.micro_batch, "grad_accum": plan.grad_accum,
            "activation_checkpointing": s.grad_ckpt, "offload_optimizer": s.offload_optimizer, "offload_param": s.offload_param,
            "optimizer": s.optimizer, "fits": plan.fits, "dtype": s.dtype, "packing": req.packing, "attention": req.attention,
            "expandable_segments": s.expandable_segments,
            "per_gpu_bytes": m.as_dict(), "cpu_bytes_per_node": m.cpu_per_node, "budget_bytes": int(req.gpu_mem_gib * GiB),
            "parameters": count_parameters(req.cfg), "data_parallel": req.dp, "seq_len": req.seq_len,
            "reasons": plan.reasons, "setting": asdict(s)}


def rows(m: Breakdown, s: Setting) -> list[tuple[str, int]]:
    """The report's lines: every term of the per-GPU arithmetic, named."""
    return [("parameters", m.params), ("gradients", m.grads), (f"optimizer states ({s.optimizer})", m.optimizer),
            ("ZeRO-3 live parameters", m.live_params), ("activations", m.activations),
            ("attention mask (sentence packing)", m.attention_mask),
            ("backward peak (" + ("layer recompute" if s.grad_ckpt else "logits grads") + ")", m.backward_peak),
            ("communication buckets", m.buckets), ("cuBLAS workspaces", m.cublas_workspace),
            ("fragmentation (expandable_segments " + ("on)" if s.expandable_segments else "off)"), m.fragmentation),
            ("CUDA context", m.cuda_context), ("NCCL buffers", m.nccl)]


def table(plan: Plan, req: Request) -> str:
    m, s = plan.memory, plan.setting
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    w = 40
    out = [f"per GPU ({req.gpus_per_node} GPUs x {req.nodes} nodes, {count_parameters(req.cfg) / 1e6:,.1f}M parameters, "
           f"seq {req.seq_len}, {s.dtype}, {s.optimizer}, packing {req.packing})", "-" * (w + 12)]
    out += [f"{name:<{w}}{g(v)}" for name, v in rows(m, s)]
    out += ["-" * (w + 12), f"{'total':<{w}}{g(m.total)}", f"{'budget':<{w}}{g(req.gpu_mem_gib * GiB)}",
            f"{'expected max_memory_allocated':<{w}}{g(m.allocated)}", f"{'expected max_memory_reserved':<{w}}{g(m.reserved)}"]
    if m.cpu_per_node:
        out += [f"{'CPU per node (offload)':<{w}}{g(m.cpu_per_node)}"
                + (f" of {req.cpu_mem_gib:g} GiB" if req.cpu_mem_gib is not None else "")]
    out += ["", "why:"] + [f"  - {r}" for r in plan.reasons]
    if not s.expandable_segments:
        out += ["  - tip: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True cuts fragmentation (planned 10% -> 2%)"]
    return "\n".join(out)


def best_per_candidate(req: Request) -> list[Plan]:
    """For the picture: each candidate configuration at its largest fitting micro-batch (else micro-batch 1)."""
    per_gpu = sequences_per_gpu(req)
    optimizer = "adamw" if req.optimizer == "auto" else req.optimizer
    out = []
    for stage, ckpt, off_opt, off_par, why in candidates(req.dp, req.fixed.get("zero_stage")):
        if (off_opt or off_par) and req.cpu_mem_gib == 0:
            continue
        mbs = micro_batches(per_gpu)
        chosen = None
        for mb in mbs:
            s = _setting(req, stage, mb, ckpt, off_opt, off_par, optimizer)
            m = evaluate(req, s)
            if fits(req, m):
                chosen = Plan(s, per_gpu // mb if per_gpu else 1, m, [why])
                break
        if chosen is None:
            s = _setting(req, stage, mbs[-1], ckpt, off_opt, off_par, optimizer)
            chosen = Plan(s, per_gpu // mbs[-1] if per_gpu else 1, evaluate(req, s), [why], fits=False)
        out.append(chosen)
    return out


def plot(plans: list[Plan], req: Request, path: str | os.PathLike, chosen: Plan | None = None) -> None:
    """A stacked bar of the per-GPU bytes of each configuration against the budget line (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if chosen is not None and not any(p.setting == chosen.setting for p in plans):
        plans = [*plans, chosen]
    names = [n for n, _ in rows(plans[0].memory, plans[0].setting)]
    colors = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(plans) + 2), 5.5))
    bottoms = [0.0] * len(plans)
    for k, name in enumerate(names):
        vals = [rows(p.memory, p.setting)[k][1] / GiB for p in plans]
        label = name.split(" (")[0] if k in (2, 6, 9) else name
        ax.bar(range(len(plans)), vals, bottom=bottoms, color=colors[k % len(colors)], label=label, width=0.7)
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    ax.axhline(req.gpu_mem_gib, color="black", linestyle="--", linewidth=1.2)
    ax.text(len(plans) - 0.5, req.gpu_mem_gib, f" budget {req.gpu_mem_gib:g} GiB", va="bottom", ha="right", fontsize=8)
    labels = []
    for p in plans:
        s = p.setting
        off = "\n+opt offload" if s.offload_optimizer and not s.offload_param else "\n+all offload" if s.offload_param else ""
        mark = " *" if chosen is not None and s == chosen.setting else ""
        labels.append(f"ZeRO-{s.zero_stage}{mark}\n{'ckpt' if s.grad_ckpt else 'no ckpt'}{off}\nmb {s.micro_batch}"
                      + ("" if p.fits else "\n(no fit)"))
    ax.set_xticks(range(len(plans)), labels, fontsize=7)
    ax.set_ylabel("GiB per GPU")
    ax.set_title(f"{count_parameters(req.cfg) / 1e6:,.0f}M params, {req.dp} GPUs, seq {req.seq_len}, {plans[0].setting.dtype}, "
                 f"{plans[0].setting.optimizer}" + ("  (* = plan)" if chosen is not None else ""), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


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
