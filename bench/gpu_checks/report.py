"""What the GPU check runs (sizes), what it found (the report), and where the table goes."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    import numpy as np
except ImportError:  # reported by no_gpu_reason with the rest of what is missing
    np = None

try:
    from lvm.eval.learning import CPU_RECIPE, GPU_RECIPE, Recipe
except ImportError:  # reported by no_gpu_reason with the rest of what is missing
    CPU_RECIPE = GPU_RECIPE = Recipe = None

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
GIB = 2**30


@dataclass
class Sizes:
    """What each step runs; `smoke` shrinks everything to check the plumbing on a CPU."""

    models: tuple = (("300m", 4), ("1b", 2))  # (preset, micro-batch) of the throughput runs
    seq: int = 4096
    steps: int = 20
    log_every: int = 10
    corpus_videos: int = 800
    corpus_frames: int = 8
    learn: Recipe = GPU_RECIPE
    precision: str = "bf16"
    workers: int = 8
    options: tuple = ("sdpa", "flash_attention_2", "liger", "compile", "all")
    packing_model: str = "100m"


SMOKE = Sizes(models=(("tiny", 2),), seq=512, steps=4, log_every=2, corpus_videos=40, learn=CPU_RECIPE.scaled(1, 4), precision="fp32", workers=2, options=("sdpa",),
              packing_model="tiny")


@dataclass
class Report:
    rows: list = field(default_factory=list)  # [section, measure, value, note]
    data: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)

    def row(self, section: str, measure: str, value: str, note: str = "") -> None:
        self.rows.append([section, measure, value, note])
        print(f"[gpu-check] {section} | {measure} | {value} | {note}", flush=True)

    def fail(self, section: str, measure: str, why: str) -> None:
        self.failed.append(f"{section}: {measure}")
        self.row(section, measure, "failed", why[:200])


# import name -> distribution, for what every step needs (liger-kernel and flash-attn are optional rows)
NEEDED = {"numpy": "numpy", "torch": "torch", "deepspeed": "deepspeed", "transformers": "transformers", "av": "av",
          "braceexpand": "braceexpand", "pyarrow": "pyarrow", "datasets": "datasets", "lvm": "lvm-pretrain"}


def no_gpu_reason() -> str | None:
    missing = [dist for mod, dist in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        return (f"{sys.executable} lacks {', '.join(missing)}: on a machine with an index run "
                "`make gpu-wheels HAVE=<this machine's pip freeze>` and copy wheels/gpu here (see launch/wheelhouse.py)")
    import torch

    if not torch.cuda.is_available():
        return ("make gpu-check needs a CUDA GPU and none is visible here (torch.cuda.is_available() is False); "
                "run it on a GPU machine")
    return None


def environment() -> dict:
    import deepspeed
    import torch
    import transformers

    from lvm.train.metrics import device_peak_flops

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    peak = device_peak_flops("bf16", 0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "gpus": torch.cuda.device_count(), "bf16_peak_tflops": peak / 1e12 if peak else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}


def markdown(rep: Report, env: dict, seconds: float) -> str:
    head = (f"`make gpu-check` on {env['gpu']} ({env['gpus']} visible; bf16 peak {env['bf16_peak_tflops'] or 'n/a'} TFLOP/s), "
            f"PyTorch {env['torch']} (CUDA {env['cuda']}), DeepSpeed {env['deepspeed']}, transformers {env['transformers']}, "
            f"{env['cpus']} CPUs; {seconds:.0f} s in all.")
    lines = [head, "", "| step | measure | value | note |", "| --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rep.rows]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def put_in_benchmarks(md_file: Path, table: str) -> None:
    """The table between the gpu-check markers of docs/benchmarks.md (a GPU section is added if missing)."""
    text = md_file.read_text() if md_file.is_file() else "# Benchmarks\n"
    block = f"{BEGIN}\n{table}{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## GPU check (`make gpu-check`)\n\n" + block + "\n"
    write_atomic(md_file, text)
