"""Every option of `launch/pretrain.py`, with its one default and help text."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from lvm.model.presets import DEFAULT_SEQ_LEN, PRESETS
from lvm.train.optimizers import OPTIMIZERS
from lvm.train.schedule import SCHEDULES


@dataclass
class RunOptions:
    data: list[str] = field(default_factory=lambda: ["data/shards"])
    data_weights: list[float] | None = None
    val_data: list[str] | None = None
    verify_data: bool = False
    model: str = "tiny"
    init_from: str | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    output: str | None = None
    ds_config: str = "ds_configs/zero3.json"
    max_steps: int = 1000
    lr: float = 1.5e-4
    min_lr: float = 3e-5
    warmup_steps: int | None = None
    lr_schedule: str = "cosine"
    decay_steps: int | None = None
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    micro_batch: int = 1
    grad_accum: int = 1
    global_batch_tokens: int | None = None
    grad_ckpt: bool = False
    precision: str = "auto"
    save_every: int = 500
    save_every_minutes: float | None = None
    keep_last: int = 3
    eval_every: int = 500
    eval_max_sentences: int | None = None
    log_every: int = 10
    resume: str = "auto"
    data_changed: str = "refuse"
    packing: str = "concat"
    max_bad_steps: int = 10
    gpu_mem_gib: float | None = None
    optimizer: str = "adamw"
    attention: str = "auto"
    kernels: str = "none"
    compile: bool = False

    def run_dir(self) -> str:
        name = Path(self.init_from).name if self.init_from else self.model.replace("/", "_")
        return self.output or f"runs/{name}-s{self.seq_len}"


HELP = {
    "data": "training sources: make_shards output folders (each uses its train/) or folders of *.arrow files; "
            "several make a weighted mixture",
    "data_weights": "share of the windows drawn from each --data source (normalised; default: proportional to tokens)",
    "val_data": "validation shards, one folder per --data source (default: SOURCE/val, or SOURCE/../val)",
    "verify_data": "read every token of every shard before training (default: check sizes and recorded counts only)",
    "model": f"preset ({', '.join(PRESETS)}) or a path to a LlamaConfig JSON",
    "init_from": "start from this Hugging Face LlamaForCausalLM folder (e.g. LVM-7B): its config.json is the "
                 "architecture (--model may be omitted), its weights the start; the optimizer starts fresh "
                 "(default: none, random initialisation)",
    "seq_len": "tokens per training window",
    "output": "run folder (default runs/<model>-s<seq_len>): checkpoints/, tensorboard/, metrics.jsonl",
    "ds_config": "DeepSpeed JSON; values it leaves \"auto\" are filled from these flags",
    "max_steps": "optimizer steps to train",
    "lr": "peak learning rate (LVM: 1.5e-4)",
    "min_lr": "learning rate at the end of the decay (LVM: 3e-5)",
    "warmup_steps": "linear warmup steps (default: LVM's 8000, at most a tenth of --decay-steps)",
    "lr_schedule": "cosine (LVM), wsd (warmup, stable, then a linear decay over the last --decay-fraction of "
                   "--decay-steps) or constant",
    "decay_steps": "step at which the decay reaches --min-lr, then held (default: --max-steps when the run starts; "
                   "saved with the checkpoints, so a larger --max-steps on resume does not stretch it; "
                   "LVM: 288000 of 400000)",
    "decay_fraction": "wsd: share of --decay-steps spent decaying",
    "weight_decay": "AdamW weight decay (not applied to norms)",
    "grad_clip": "gradient-norm clipping",
    "seed": "seed of the data order and the initialisation",
    "micro_batch": "windows per GPU per micro-step",
    "grad_accum": "micro-steps per optimizer step",
    "global_batch_tokens": "tokens per optimizer step; sets --grad-accum (exclusive with it)",
    "grad_ckpt": "activation (gradient) checkpointing",
    "precision": "auto (bf16 where supported, fp32 on CPU), bf16, fp16 (loss scaling) or fp32",
    "save_every": "checkpoint every N steps (and at the end)",
    "save_every_minutes": "also checkpoint when this many minutes passed since the last checkpoint (default: off)",
    "keep_last": "checkpoints kept",
    "eval_every": "validation every N steps (and at the end); 0 disables",
    "eval_max_sentences": "cap on validation sentences (default: all)",
    "log_every": "log every N steps",
    "resume": "auto (latest checkpoint in the run folder, if any), none, or a checkpoint path",
    "data_changed": "resuming on data that changed since the checkpoint (e.g. more shards): refuse, before any compute, "
                    "or continue: keep the step, optimizer and schedule and start a new epoch layout over the data as it "
                    "is now from the next window (logged in one line)",
    "packing": "concat: sentences concatenated and cut into windows; sentence: whole sentences best-fit, padded",
    "max_bad_steps": "stop after this many consecutive steps with a non-finite loss",
    "gpu_mem_gib": "GPU memory budget: the planner fills ds_config values left \"auto\"",
    "optimizer": "optimizer (AdamW and Lion via DeepSpeed; SGD with momentum; 8-bit AdamW via bitsandbytes)",
    "attention": "attention kernels: auto (flash-attention-2 where installed and on a GPU, else sdpa), flash_attention_2, "
                 "sdpa or eager; one that cannot run here falls back to sdpa with one log line",
    "kernels": "fused kernels: none, or liger (Liger-Kernel's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy; "
               "needs liger-kernel and a GPU, else one log line and none)",
    "compile": "torch.compile every decoder layer (the first steps include the compilation; the first forward says "
               "in one line whether the layers compiled or fell back to eager)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain a LlamaForCausalLM on visual sentences with DeepSpeed.")
    defaults = RunOptions()
    for f in fields(RunOptions):
        flag = "--ds_config" if f.name == "ds_config" else "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        text = HELP[f.name] if "default" in HELP[f.name] else f"{HELP[f.name]} (default: {shown})"  # shown once
        kw = {"dest": f.name, "default": None, "help": text}
        if f.name in ("grad_ckpt", "verify_data", "compile"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if f.name in ("data", "val_data", "data_weights"):
            p.add_argument(flag, nargs="+", type=float if f.name == "data_weights" else str,
                           metavar="W" if f.name == "data_weights" else "PATH", **kw)
            continue
        if f.name == "packing":
            kw["choices"] = ["concat", "sentence"]
        if f.name == "data_changed":
            kw["choices"] = ["refuse", "continue"]
        if f.name == "precision":
            kw["choices"] = ["auto", "bf16", "fp16", "fp32"]
        if f.name == "attention":
            kw["choices"] = ["auto", "flash_attention_2", "sdpa", "eager"]
        if f.name == "kernels":
            kw["choices"] = ["none", "liger"]
        if f.name == "optimizer":
            kw["choices"] = list(OPTIMIZERS)
        if f.name == "lr_schedule":
            kw["choices"] = list(SCHEDULES)
        typ = {"seq_len": int, "max_steps": int, "warmup_steps": int, "seed": int, "micro_batch": int,
               "grad_accum": int, "global_batch_tokens": int, "save_every": int, "keep_last": int,
               "eval_every": int, "eval_max_sentences": int, "log_every": int, "max_bad_steps": int,
               "decay_steps": int, "decay_fraction": float,
               "save_every_minutes": float, "lr": float, "min_lr": float, "weight_decay": float, "grad_clip": float, "gpu_mem_gib": float}.get(f.name, str)
        p.add_argument(flag, type=typ, **kw)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def check_weights(data: list[str], weights: list[float] | None) -> None:
    if weights is None:
        return
    if len(weights) != len(data):
        raise ValueError(f"--data-weights has {len(weights)} values for {len(data)} --data sources: give one weight per source")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"--data-weights must be positive numbers, got {bad[0]}")


def parse_options(argv=None) -> tuple[RunOptions, set[str]]:
    """(options, names the user set explicitly): explicit flags may not contradict the ds_config."""
    ns = build_parser().parse_args(argv)
    given = {f.name for f in fields(RunOptions) if getattr(ns, f.name) is not None}
    opts = RunOptions(**{k: getattr(ns, k) for k in given})
    if "grad_accum" in given and "global_batch_tokens" in given:
        raise ValueError("give --grad-accum or --global-batch-tokens, not both")
    for name in ("seq_len", "max_steps", "micro_batch", "grad_accum", "keep_last", "log_every", "max_bad_steps"):
        if getattr(opts, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if opts.seed < 0:
        raise ValueError("--seed must be >= 0")
    if opts.save_every_minutes is not None and not opts.save_every_minutes > 0:
        raise ValueError("--save-every-minutes must be > 0")
    check_weights(opts.data, opts.data_weights)
    if opts.resume not in ("auto", "none") and not opts.resume:
        raise ValueError("--resume must be auto, none or a checkpoint path")
    return opts, given
