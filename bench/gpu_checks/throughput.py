"""Steps 1 and 3: training throughput and MFU per attention/kernel option; planned vs measured peak memory."""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
import time
from pathlib import Path

try:
    import numpy as np
except ImportError:  # reported by no_gpu_reason with the rest of what is missing
    np = None

from gpu_checks.data import random_source
from gpu_checks.procs import Proc, free_port
from gpu_checks.report import GIB, Report, Sizes


def option_flags(option: str, have_flash: bool, have_liger: bool) -> list[str] | None:
    """pretrain.py flags of an option; None when it is not available here."""
    attention = ["--attention", "flash_attention_2" if have_flash else "sdpa"]
    if option == "sdpa":
        return ["--attention", "sdpa"]
    if option == "flash_attention_2":
        return ["--attention", "flash_attention_2"] if have_flash else None
    if option == "liger":
        return [*attention, "--kernels", "liger"] if have_liger else None
    if option == "compile":
        return [*attention, "--compile"]
    if option == "all":
        flags = [*attention, "--compile"] + (["--kernels", "liger"] if have_liger else [])
        return flags if (have_flash or have_liger) else None  # else the same as "compile"
    raise ValueError(option)


def describe_option(flags: list[str]) -> str:
    parts = [flags[flags.index("--attention") + 1]]
    if "--kernels" in flags:
        parts.append("liger")
    if "--compile" in flags:
        parts.append("compile")
    return " + ".join(parts)


def throughput_run(model: str, micro: int, flags: list[str], data: Path, out: Path, sz: Sizes, timeout: float) -> dict:
    """One pretrain.py run; stopped once its last step is logged. The trainer's own numbers of its last window."""
    import shutil

    run_dir = out / "runs" / f"{model}-{describe_option(flags).replace(' + ', '-')}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "launch/pretrain.py", "--model", model, "--data", str(data), "--output", str(run_dir),
           "--ds_config", "ds_configs/zero2.json", "--seq-len", str(sz.seq), "--micro-batch", str(micro),
           "--grad-accum", "1", "--max-steps", str(sz.steps), "--lr-schedule", "constant", "--warmup-steps", "0",
           "--lr", "1e-4", "--log-every", str(sz.log_every), "--eval-every", "0", "--save-every", str(10**9),
           "--resume", "none", "--precision", sz.precision, *flags]
    p = Proc(cmd, out / "logs" / f"{run_dir.name}.log", {"MASTER_PORT": str(free_port())})
    deadline = time.perf_counter() + timeout
    last = f"step {sz.steps}/{sz.steps} "
    done = False
    while time.perf_counter() < deadline:
        line = p.next_line(deadline - time.perf_counter())
        if line is None:
            break
        if last in line:  # the last window is in metrics.jsonl (written before the console line)
            done = True
            break
    p.signal(signal.SIGKILL)  # the end-of-training checkpoint is not part of the measurement
    p.wait(30)
    rows = []
    if (run_dir / "metrics.jsonl").is_file():
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("split") == "train"]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    notes = [x.split("] ", 1)[-1] for x in p.out if "] attention:" in x or "] kernels:" in x or "] compile:" in x
             or "--attention" in x or "--kernels" in x or "--compile" in x]
    if not done or not rows:
        return {"ok": False, "why": p.tail() if p.p.returncode not in (None, -signal.SIGKILL) else "no last step within the time limit",
                "seconds": p.seconds()}
    r = rows[-1]
    return {"ok": True, "tokens_per_s": r.get("tokens_per_s"), "mfu": r.get("mfu"), "tflops_per_s": r.get("tflops_per_s"),
            "max_allocated": (r.get("memory_gib") or 0) * GIB, "max_reserved": (r.get("memory_reserved_gib") or 0) * GIB,
            "loss": r.get("loss"), "windows": [(x["step"], x.get("tokens_per_s"), x.get("mfu")) for x in rows],
            "notes": notes, "seconds": p.seconds()}


def planned_memory(model: str, micro: int, seq: int, attention: str, dtype: str) -> tuple[float, float]:
    from bench_plan import planned

    plan = planned({"stage": 2, "ckpt": False, "micro_batch": micro, "packing": "concat", "attention": attention}, model, seq, dtype)
    return plan.memory.allocated, plan.memory.reserved


def step_throughput(rep: Report, out: Path, sz: Sizes, deadline: float, cuda: bool) -> None:
    import torch

    from lvm.model.attention import flash_attn_unavailable

    # a flash-attn that installs but cannot run (built for another torch) would make the row measure sdpa
    flash_why = flash_attn_unavailable(torch.device("cuda" if cuda else "cpu"), torch.bfloat16) if cuda else "no GPU"
    have_flash = flash_why is None
    have_liger = importlib.util.find_spec("liger_kernel") is not None
    rep.data["installed"] = {"flash_attn": have_flash, "liger_kernel": have_liger}
    data = random_source(out / "random_tokens", sentences=64 if cuda else 8)
    combos = []  # (model, micro, option, flags): the sdpa and fastest runs of each model first
    first = [o for o in ("sdpa", "all" if option_flags("all", have_flash, have_liger) else "compile") if o in sz.options]
    for model, micro in sz.models:
        for option in first:
            combos.append((model, micro, option, option_flags(option, have_flash, have_liger)))
    for model, micro in sz.models:
        for option in sz.options:
            flags = option_flags(option, have_flash, have_liger)
            if option not in first and flags is not None:
                combos.append((model, micro, option, flags))
    for option in sz.options:
        if option_flags(option, have_flash, have_liger) is None:
            why = {"flash_attention_2": f"flash-attention-2 cannot run: {flash_why}", "liger": "liger-kernel is not installed",
                   "all": "neither flash-attn nor liger-kernel is installed (same as compile)"}[option]
            rep.row("1 train", f"option {option}", "n/a", why)
    results = rep.data.setdefault("throughput", [])
    per_run = 240.0 if cuda else 600.0
    for model, micro, option, flags in combos:
        label = f"{model}, {describe_option(flags)}, micro {micro}"
        if time.perf_counter() + 45 > deadline:
            rep.row("1 train", label, "skipped", "time budget spent")
            continue
        r = throughput_run(model, micro, flags, data, out, sz, min(per_run, deadline - time.perf_counter()))
        r.update(model=model, micro=micro, option=option, flags=flags)
        results.append(r)
        if not r["ok"]:
            rep.fail("1 train", label, r["why"])
            continue
        mfu = f"MFU {r['mfu']:.1%}" if r.get("mfu") is not None else "MFU n/a (no bf16 peak)"
        goal = "; goal MFU >= 50%" if model == "1b" else ""
        rep.row("1 train", f"{label}, seq {sz.seq}, {sz.precision}, ZeRO-2",
                f"{r['tokens_per_s']:,.0f} tok/s", f"{mfu}, {r['tflops_per_s']:.0f} TFLOP/s{goal}; " + "; ".join(r["notes"])[:160])
        if cuda:
            attention = "flash_attention_2" if "flash_attention_2" in flags else "sdpa"
            pa, pr = planned_memory(model, micro, sz.seq, attention, sz.precision)
            r.update(planned_allocated=pa, planned_reserved=pr)
            ea, er = pa / r["max_allocated"] - 1, pr / r["max_reserved"] - 1
            rep.row("3 memory", label, f"planned {pa / GIB:.2f} / measured {r['max_allocated'] / GIB:.2f} GiB allocated",
                    f"{ea:+.1%}; reserved planned {pr / GIB:.2f} / measured {r['max_reserved'] / GIB:.2f} GiB ({er:+.1%}); goal within 10%")
