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

from dataclasses import dataclass, field, replace

from lvm.model.presets import ModelShape, count_parameters
from lvm.plan.memory import Breakdown, breakdown
from lvm.plan.setting import DS_DEFAULT_LIVE, GiB, Setting, expandable_segments_from_env
from lvm.train.optimizers import OPTIMIZERS


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
