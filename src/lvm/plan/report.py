"""A plan shown: its JSON report, the per-GPU memory table, and a picture of every candidate against the budget."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from lvm.model.presets import count_parameters
from lvm.plan.memory import Breakdown
from lvm.plan.search import Plan, Request
from lvm.plan.setting import GiB, Setting


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
