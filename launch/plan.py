#!/usr/bin/env python
"""Configure a run from its GPU-memory budget: choose ZeRO stage, micro-batch, accumulation,
activation checkpointing, CPU offload and (with --optimizer auto) the optimizer, write a ready
DeepSpeed config, and explain every byte (model states, ZeRO-3 live parameters, activations, the
attention mask of sentence packing, the backward peak, buckets, cuBLAS, fragmentation, CUDA context, NCCL).

    python launch/plan.py --model 1b --gpus-per-node 8 --gpu-mem-gib 80 --seq-len 4096 \\
        --global-batch-tokens 524288 --out ds_configs/plan-1b-8x80.json --report plan.json --plot plan.png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from lvm.model.presets import model_shape
from lvm.plan.apply import ds_config
from lvm.plan.report import plot, report, table
from lvm.plan.search import PlanError, Request, best_per_candidate, evaluate_given, search
from lvm.train.optimizers import OPTIMIZERS


def write_atomic(path: str, text: str) -> None:
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1b", help="preset name or LlamaConfig JSON (as launch/pretrain.py --model)")
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem-gib", type=float, required=True, help="memory of one GPU")
    p.add_argument("--cpu-mem-gib", type=float, default=None, help="host memory per node (offload budget); 0 forbids offload")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--global-batch-tokens", type=int, default=None, help="tokens per optimizer step")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--optimizer", choices=[*OPTIMIZERS, "auto"], default="adamw",
                   help="optimizer whose states are planned; auto: AdamW unless only 8-bit AdamW avoids CPU offload")
    p.add_argument("--packing", choices=["concat", "sentence"], default="concat",
                   help="as pretrain.py --packing: sentence makes SDPA build and save a block-causal mask")
    default_attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    p.add_argument("--attention", choices=["sdpa", "flash_attention_2"], default=default_attn,
                   help="attention kernel of the run (default: flash_attention_2 where flash-attn is installed)")
    p.add_argument("--expandable-segments", choices=["on", "off"], default=None,
                   help="PyTorch allocator expandable_segments (default: as PYTORCH_CUDA_ALLOC_CONF says here)")
    p.add_argument("--micro-batch", type=int, default=None, help="evaluate this configuration instead of searching")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None, help="with --micro-batch (default 2)")
    p.add_argument("--grad-ckpt", choices=["on", "off"], default="off", help="with --micro-batch")
    p.add_argument("--offload", choices=["none", "optimizer", "all"], default="none", help="with --micro-batch")
    p.add_argument("--out", default=None, help="write the DeepSpeed config here")
    p.add_argument("--report", default=None, help="write the plan as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG: a stacked bar per candidate configuration against the budget")
    a = p.parse_args(argv)
    try:
        if min(a.gpus_per_node, a.nodes, a.seq_len) < 1 or a.gpu_mem_gib <= 0:
            raise PlanError("--gpus-per-node, --nodes, --seq-len and --gpu-mem-gib must be positive")
        if a.micro_batch is not None and a.micro_batch < 1:
            raise PlanError("--micro-batch must be >= 1")
        if a.plot and not a.plot.lower().endswith(".png"):
            raise PlanError(f"--plot {a.plot}: give a .png path")
        cfg = model_shape(a.model)
        gbt = a.global_batch_tokens
        if a.micro_batch is not None and gbt is None:
            gbt = a.micro_batch * a.seq_len * a.gpus_per_node * a.nodes
        expandable = None if a.expandable_segments is None else a.expandable_segments == "on"
        req = Request(cfg, a.gpus_per_node, a.nodes, a.gpu_mem_gib, a.cpu_mem_gib, a.seq_len, gbt, a.dtype,
                      optimizer=a.optimizer, packing=a.packing, attention=a.attention, expandable_segments=expandable)
        if a.micro_batch is not None:
            stage = a.zero_stage if a.zero_stage is not None else 2
            if a.offload == "all" and stage != 3:
                raise PlanError("--offload all needs --zero-stage 3")
            plan = evaluate_given(req, stage, a.micro_batch, a.grad_ckpt == "on", a.offload != "none", a.offload == "all")
        else:
            plan = search(req)
    except (PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(plan, req))
    if a.out:
        write_atomic(a.out, json.dumps(ds_config(plan), indent=2) + "\n")
        print(f"\nwrote {a.out}: deepspeed launch/pretrain.py --ds_config {a.out} --model {a.model} --seq-len {a.seq_len}"
              + f" --packing {a.packing}" + (" --grad-ckpt" if plan.setting.grad_ckpt else ""))
    if a.report:
        write_atomic(a.report, json.dumps(report(plan, req), indent=2) + "\n")
    if a.plot:
        plot(best_per_candidate(req if plan.setting.optimizer == req.optimizer else
                                Request(**{**req.__dict__, "optimizer": plan.setting.optimizer})), req, a.plot, chosen=plan)
        print(f"wrote {a.plot}")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
