#!/usr/bin/env python
"""The planner against DeepSpeed and against a GPU.

    python bench/bench_plan.py            model states vs DeepSpeed's estimators, optimizer bytes, planning time (CPU)
    python bench/bench_plan.py --gpu      planned peak vs torch.cuda.max_memory_allocated / max_memory_reserved for
                                          the 300m preset at seq 4096 on one GPU: ZeRO-2/3 x checkpointing on/off x
                                          micro-batch 2 and 4 (and sentence packing once); goal: within 10%.
                                          [--md FILE] also writes the table as markdown. Needs a CUDA device.

Each GPU configuration runs in its own process (a fresh allocator and DeepSpeed state): a real DeepSpeed
engine, the planner's own ds_config, bf16, AdamW, four optimizer steps on random tokens, peak counters
read after the last one (ZeRO-3 keeps gathered weights only once its trace is complete, after step 1).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from lvm.model.presets import PRESETS, count_parameters, model_shape  # noqa: E402
from lvm.plan.apply import ds_config  # noqa: E402
from lvm.plan.model_states import largest_layer_params, model_states, optimizer_state_bytes  # noqa: E402
from lvm.plan.search import Plan, Request, evaluate, fit_buckets, search  # noqa: E402
from lvm.plan.setting import GiB, Setting  # noqa: E402
from lvm.train.optimizers import OPTIMIZERS  # noqa: E402

GPU_MODEL, GPU_SEQ, GPU_STEPS = "300m", 4096, 4
GPU_CASES = [{"stage": st, "ckpt": ck, "micro_batch": mb, "packing": "concat"}
             for st in (2, 3) for ck in (False, True) for mb in (2, 4)]
GPU_CASES.append({"stage": 2, "ckpt": False, "micro_batch": 2, "packing": "sentence"})


def cpu_tables() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    gpus = 8
    for name in PRESETS:
        shape = model_shape(name)
        n, big = count_parameters(shape), largest_layer_params(shape)
        ours2 = sum(model_states(shape, Setting(2, 1, False, grad_accum_dtype="bf16"), gpus, gpus)[:3])  # as the estimators
        ours3 = sum(model_states(shape, Setting(3, 1, False, grad_accum_dtype="bf16"), gpus, gpus)[:3])
        ds2 = estimate_zero2_model_states_mem_needs(n, gpus, 1, cpu_offload=False)[1]
        ds3 = estimate_zero3_model_states_mem_needs(n, big, gpus, 1, cpu_offload=False, cpu_offload_params=False)[1]
        rows.append([name, f"{n / 1e6:,.1f}M", f"{ours2 / GiB:.3f}", f"{ds2 / GiB:.3f}", f"{ours3 / GiB:.3f}", f"{ds3 / GiB:.3f}",
                     f"{max(abs(ours2 - ds2) / ds2, abs(ours3 - ds3) / ds3):.2%}"])
    print_table(f"Model states per GPU (GiB), bf16 AdamW, {gpus} GPUs: planner vs DeepSpeed estimators",
                ["model", "params", "ZeRO-2 ours", "ZeRO-2 DS", "ZeRO-3 ours", "ZeRO-3 DS", "max diff"], rows)
    shape = model_shape("7b")
    n = count_parameters(shape)
    rows = []
    for opt in OPTIMIZERS:
        state = optimizer_state_bytes(shape, opt, 1)
        s2 = sum(model_states(shape, Setting(2, 1, False, optimizer=opt), 8, 8)[:3])
        rows.append([opt, f"{state / n:.3f}", f"{(state + 4 * n) / n:.3f}", f"{s2 / GiB:.2f}"])
    print_table("Optimizer state per parameter (7b, bf16): state, + fp32 master, model states per GPU at ZeRO-2 x 8",
                ["optimizer", "state B/param", "+ master B/param", "ZeRO-2 x 8 GiB"], rows)
    t = time.perf_counter()
    plan = search(Request(model_shape("7b"), 8, 1, 80, None, 4096, 524288))
    dt = time.perf_counter() - t
    s = plan.setting
    print_table("Planning time", ["request", "choice", "seconds"],
                [["7b, 8 x 80 GiB, seq 4096, 0.5M tokens/step",
                  f"ZeRO-{s.zero_stage}, micro {s.micro_batch} x accum {plan.grad_accum}, ckpt {'on' if s.grad_ckpt else 'off'}", f"{dt:.4f}"]])


def planned(case: dict, model: str = GPU_MODEL, seq: int = GPU_SEQ, dtype: str = "bf16") -> Plan:
    req = Request(model_shape(model), 1, 1, 80, None, seq, seq * case["micro_batch"], dtype,
                  packing=case["packing"], attention=case.get("attention", "sdpa"), expandable_segments=case.get("expandable"))
    s = fit_buckets(req, Setting(case["stage"], case["micro_batch"], case["ckpt"], dtype, attn_mask=req.attn_mask,
                                 expandable_segments=req.expandable))
    return Plan(s, 1, evaluate(req, s), [])


def training_ds_config(plan: Plan, seq: int, device) -> dict:
    """The planner's ds_config resolved as launch/pretrain.py resolves it (`lvm.train.ds_config.resolve`), so the
    engine measured is the one training builds: with bf16 under ZeRO, gradients accumulated in fp32
    (`data_types.grad_accum_dtype`); AdamW as torch's fused AdamW where DeepSpeed's FusedAdam is not prebuilt."""
    from lvm.train.ds_config import resolve
    from lvm.train.options import RunOptions

    s = plan.setting
    opts = RunOptions(seq_len=seq, micro_batch=s.micro_batch, grad_accum=plan.grad_accum, lr=1e-4, weight_decay=0.1,
                      grad_clip=1.0, precision=s.dtype, optimizer=s.optimizer, grad_ckpt=s.grad_ckpt)
    given = {"micro_batch", "grad_accum", "lr", "weight_decay", "grad_clip", "precision", "optimizer", "grad_ckpt"}
    return resolve(ds_config(plan), opts, given, 1, device)


def measure_one(case: dict, model_name: str = GPU_MODEL, seq: int = GPU_SEQ, device: str = "cuda") -> dict:
    """In this process: one real DeepSpeed engine under the planner's ds_config, GPU_STEPS steps; peak counters.

    GPU-only in its purpose (device="cpu" runs the same path without counters, to check the code on a CPU machine)."""
    import deepspeed
    import torch
    from transformers import LlamaForCausalLM

    from lvm.model.presets import attention_implementation, llama_config

    cuda = device == "cuda"
    case = {**case, "attention": attention_implementation()}
    plan = planned(case, model_name, seq, "bf16" if cuda else "fp32")
    ds = training_ds_config(plan, seq, torch.device(device))
    if cuda:
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        free0, total = torch.cuda.mem_get_info()
    torch.manual_seed(0)
    cfg = llama_config(model_name, seq)
    keep = None
    if case["stage"] == 3:  # built inside deepspeed.zero.Init, as the trainer does
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=case["attention"])
    if case["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decay = [p for n, p in model.named_parameters() if not ("norm" in n or n.endswith(".bias"))]
    plain = [p for n, p in model.named_parameters() if "norm" in n or n.endswith(".bias")]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    b, s = case["micro_batch"], seq
    packed = {}
    if case["packing"] == "sentence":  # three sentences per window, passed as the trainer does (lvm.model.attention)
        from lvm.model.attention import packed_attention_kwargs

        cuts = [0, s // 3, s // 3 + s // 4, s]
        pos = torch.cat([torch.arange(cuts[k + 1] - cuts[k]) for k in range(3)]).expand(b, -1).contiguous().to(device)
        dtype = torch.bfloat16 if cuda else torch.float32
        packed = {"position_ids": pos, **packed_attention_kwargs(pos, case["attention"], dtype)}
    t = time.perf_counter()
    for _ in range(GPU_STEPS):
        ids = torch.randint(0, 8192, (b, s), device=device)
        loss = engine(input_ids=ids, labels=ids, use_cache=False, **packed).loss
        engine.backward(loss)
        engine.step()
    dt = time.perf_counter() - t
    m = plan.memory
    out = {**case, "planned_allocated": m.allocated, "planned_reserved": m.reserved, "planned_total": m.total,
           "planned_context": m.cuda_context + m.nccl, "seconds_per_step": dt / GPU_STEPS, "loss": float(loss)}
    del keep
    if not cuda:
        return out
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    return {**out, "max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
            "outside_allocator": (total - free1) - torch.cuda.memory_reserved(), "context_before": total - free0,
            "device": torch.cuda.get_device_name(0)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_table(md: str | None) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench_plan --gpu: no CUDA device here; the planned-vs-measured check needs one GPU", file=sys.stderr)
        return 2
    rows, results = [], []
    for case in GPU_CASES:
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        r = subprocess.run([sys.executable, __file__, "--gpu-one", json.dumps(case)], capture_output=True, text=True, env=env)
        out = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or not out:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append([f"ZeRO-{case['stage']}", "on" if case["ckpt"] else "off", case["micro_batch"], case["packing"],
                         "-", "-", "-", "-", "-", "-", f"failed: {last[:80]}"])
            continue
        x = json.loads(out[-1][len("RESULT "):])
        results.append(x)
        ea = x["planned_allocated"] / x["max_allocated"] - 1
        er = x["planned_reserved"] / x["max_reserved"] - 1
        rows.append([f"ZeRO-{x['stage']}", "on" if x["ckpt"] else "off", x["micro_batch"], x["packing"],
                     f"{x['planned_allocated'] / GiB:.2f}", f"{x['max_allocated'] / GiB:.2f}", f"{ea:+.1%}",
                     f"{x['planned_reserved'] / GiB:.2f}", f"{x['max_reserved'] / GiB:.2f}", f"{er:+.1%}",
                     "yes" if abs(ea) <= 0.10 and abs(er) <= 0.10 else "no"])
    header = ["ZeRO", "ckpt", "micro", "packing", "planned alloc GiB", "max_allocated GiB", "diff", "planned reserved GiB",
              "max_reserved GiB", "diff", "within 10%"]
    device = results[0]["device"] if results else "?"
    title = f"Planned vs measured peak, {GPU_MODEL} seq {GPU_SEQ} bf16 AdamW, 1 GPU ({device}), {GPU_STEPS} steps"
    print_table(title, header, rows)
    for x in results[:1]:
        print(f"outside the allocator (CUDA context, NCCL, cuBLAS handles): {x['outside_allocator'] / GiB:.2f} GiB measured, "
              f"{x['planned_context'] / GiB:.2f} GiB planned")
    if md:
        lines = [f"{title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        p = Path(md)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, p)
        print(f"wrote {md}")
    return 0 if results and len(results) == len(GPU_CASES) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="planned vs measured peak on one GPU (needs CUDA)")
    p.add_argument("--md", default=None, help="with --gpu: also write the table as markdown to this file")
    p.add_argument("--gpu-one", default=None, help=argparse.SUPPRESS)  # one configuration, in a child process
    a = p.parse_args(argv)
    if a.gpu_one:
        print("RESULT " + json.dumps(measure_one(json.loads(a.gpu_one))), flush=True)
        return 0
    if a.gpu:
        return gpu_table(a.md)
    cpu_tables()
    import torch

    if torch.cuda.is_available():
        return gpu_table(a.md)
    print("\nplanned vs measured GPU peak: skipped, no CUDA device here (python bench/bench_plan.py --gpu on a GPU machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
