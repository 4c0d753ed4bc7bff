"""Resume a run on another number of ranks: same global batch, same data stream, re-partitioned states.

A ZeRO checkpoint stores the optimizer states (and, under ZeRO-3, the weights) partitioned over the
data-parallel ranks that wrote it; DeepSpeed loads it only with that world size. When the world
size differs, rank 0 converts the tag once into DeepSpeed's *universal checkpoint* (one folder per
parameter with its fp32 weights and Adam moments, `deepspeed.checkpoint.ds_to_universal`, run as its
own process) at `<tag>_universal` beside the tag (written under a temporary name, then renamed), and
every rank loads that with `"checkpoint": {"load_universal": true}`, DeepSpeed re-partitioning it for
the new world size. A later resume on the same new world size reuses the converted folder; the next
checkpoint is written for the new world size and the converted copy is pruned.

The global batch (windows per optimizer step) is the run's: without `--global-batch-tokens` or
`--grad-accum`, the accumulation is recomputed so micro batch x accumulation x ranks equals the
checkpoint's global batch, or the run stops with one line saying why it cannot. The loader's state is
the number of global windows consumed, so the data stream continues at the same window.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from lvm.artifacts import locate
from lvm.train import checkpoint as ckpt
from lvm.train.ds_config import ConfigError, resolve, zero_stage

CONVERT_TIMEOUT = timedelta(hours=6)  # how long the ranks wait for rank 0 to convert (bench/bench_resume.py times it)


@dataclass
class Resume:
    """The checkpoint a run resumes from and what it was written with."""

    ckpt_dir: Path
    tag: str
    state: dict  # run_state.json of the tag (checkpoint.read_run_state)

    @property
    def world_size(self) -> int | None:
        return self.state.get("world_size")

    @property
    def global_batch(self) -> int | None:
        """Windows per optimizer step."""
        return self.state.get("global_batch_windows")

    @property
    def step(self) -> int:
        return int(self.state.get("step") or 0)

    @property
    def schedule(self) -> dict | None:
        return self.state.get("schedule")


def find_resume(resume: str, ckpt_dir: Path) -> Resume | None:
    """The checkpoint `--resume` names: auto (this run's newest, or none), none (a fresh start, refused where
    this run already has checkpoints) or a path (`lvm.artifacts.locate`: a run, its checkpoints, a tag)."""
    if resume == "none":
        if ckpt.latest_tag(ckpt_dir):
            raise ckpt.CheckpointError(f"{ckpt_dir} already holds checkpoints and --resume none was given: "
                                       "use --resume auto to continue, or another --output")
        return None
    if resume == "auto":
        tag = ckpt.latest_tag(ckpt_dir)
        found = (ckpt_dir, tag) if tag else None
    else:
        found = locate(resume, "--resume").checkpoint()
    return Resume(found[0], found[1], ckpt.read_run_state(found[0], found[1])) if found else None


def keep_global_batch(opts, given: set[str], resume: Resume | None) -> set[str]:
    """Before the planner and `ds_config.resolve`: without --global-batch-tokens or --grad-accum, a resumed
    run asks for the checkpoint's global batch, so the accumulation is recomputed for this world size."""
    if resume is None or resume.global_batch is None or {"global_batch_tokens", "grad_accum"} & given:
        return given
    opts.global_batch_tokens = resume.global_batch * opts.seq_len
    return given | {"global_batch_tokens"}


def resolve_keeping_batch(ds_raw: dict, opts, given: set[str], world_size: int, device, resume: Resume | None) -> dict:
    """`ds_config.resolve`, then the check that the global batch is the checkpoint's (one-line errors)."""
    try:
        ds = resolve(ds_raw, opts, given, world_size, device)
    except ConfigError as e:
        if resume is not None and resume.global_batch is not None and "global-batch-tokens" in str(e):
            raise ConfigError(f"resuming {resume.tag} (written with {resume.global_batch} windows per step) on "
                              f"{world_size} rank(s): {e}; choose --micro-batch and the number of ranks so that "
                              f"micro batch x ranks divides {resume.global_batch}") from None
        raise
    if resume is not None and resume.global_batch is not None:
        windows = opts.micro_batch * opts.grad_accum * world_size
        if windows != resume.global_batch:
            raise ConfigError(
                f"the checkpoint {resume.tag} trained with {resume.global_batch} windows ({resume.global_batch * opts.seq_len} "
                f"tokens) per step; this run would take {windows} (micro batch {opts.micro_batch} x accumulation "
                f"{opts.grad_accum} x {world_size} rank(s)): give --global-batch-tokens {resume.global_batch * opts.seq_len} "
                "(or drop --grad-accum) to keep it, or start a new run")
    return ds


def run_state(step: int, world_size: int, opts, ds: dict, schedule, skipped_steps: int, data: dict | None = None) -> dict:
    """What `checkpoint.write_run_state` records with every tag; `data`: the loader's state (what it read, of which
    data), so a resume checks the data before any compute (`check_data`)."""
    state = {"step": step, "world_size": world_size, "zero_stage": zero_stage(ds), "micro_batch": opts.micro_batch,
             "grad_accum": opts.grad_accum, "global_batch_windows": opts.micro_batch * opts.grad_accum * world_size,
             "seq_len": opts.seq_len, "schedule": schedule.as_dict(), "skipped_steps": skipped_steps}
    if data is not None:
        state["data"] = data
    return state


def check_data(resume: Resume | None, windows, data_changed: str) -> None:
    """Before the engine: the data the checkpoint read (run_state.json's loader state) against this run's windows.
    Data that changed is refused in one line naming --data-changed, unless it is "continue" (then the loader starts
    a new layout when it loads the checkpoint). A tag written before run_state.json held the loader state is
    checked when its client state is loaded."""
    from lvm.data.mixture import data_change, refusal

    if resume is None or not isinstance(resume.state.get("data"), dict):
        return
    change = data_change(resume.state["data"], windows)
    if change is not None and data_changed != "continue":
        raise ValueError(refusal(change, str(resume.ckpt_dir / resume.tag)))


def needs_conversion(resume: Resume | None, world_size: int) -> bool:
    """The world size changed and the tag has partitioned optimizer states (ZeRO >= 1, or DeepSpeed's bf16
    optimizer); a ZeRO-0 fp32 checkpoint holds whole states and loads on any world size as it is."""
    if resume is None or resume.world_size is None or resume.world_size == world_size:
        return False
    return any((resume.ckpt_dir / resume.tag).glob("*optim_states.pt"))


def convert_to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert `ckpt_dir/tag` once into `ckpt_dir/<tag>_universal` (atomic: built under a temporary
    folder, then renamed); returns the universal tag. Runs DeepSpeed's converter as its own process."""
    name = tag + ckpt.UNIVERSAL_SUFFIX
    final = ckpt_dir / name
    if (final / "zero").is_dir():
        return name
    for stale in ckpt_dir.glob(f".convert-{tag}-*"):  # a conversion killed midway
        shutil.rmtree(stale, ignore_errors=True)
    work = ckpt_dir / f".convert-{tag}-{os.getpid()}"
    work.mkdir()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
           "--output_folder", str(work / name), "--num_extract_workers", str(max(1, min(16, cpus // 2))),
           "--num_merge_workers", str(max(1, min(4, cpus // 4))), "--inject_missing_state"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        last = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
        raise ckpt.CheckpointError(f"converting {ckpt_dir / tag} to a universal checkpoint failed: {last}")
    state = ckpt_dir / tag / ckpt.RUN_STATE
    if state.is_file():
        shutil.copy2(state, work / name / ckpt.RUN_STATE)
    if final.exists():  # an incomplete folder of the same name: replace it
        shutil.rmtree(final)
    os.replace(work / name, final)
    shutil.rmtree(work, ignore_errors=True)
    return name


def prepare_load(resume: Resume | None, world_size: int, rank: int, ds: dict) -> tuple[Path, str] | None:
    """(folder, tag) that `engine.load_checkpoint` reads; converts and sets `load_universal` in `ds` when the
    world size changed. Every rank calls this (after init_distributed, before deepspeed.initialize)."""
    if resume is None:
        return None
    if not needs_conversion(resume, world_size):
        return resume.ckpt_dir, resume.tag
    import torch.distributed as dist

    error, name = None, None
    if rank == 0:
        try:
            name = convert_to_universal(resume.ckpt_dir, resume.tag)
        except Exception as e:  # every rank must learn of it, not wait
            error = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        group = dist.new_group(backend="gloo", timeout=CONVERT_TIMEOUT)  # rank 0 may convert for a while
        box = [error, name]
        dist.broadcast_object_list(box, src=0, group=group)
        error, name = box
        dist.destroy_process_group(group)
    if error:
        raise ckpt.CheckpointError(error)
    ds.setdefault("checkpoint", {})["load_universal"] = True
    return resume.ckpt_dir, name


def load(engine, optimizer, where: tuple[Path, str]) -> dict:
    """engine.load_checkpoint; returns the client state. Three faults of DeepSpeed's universal load are
    undone: under ZeRO-3 it gives every parameter group the hyper-parameters of the first (weight decay on
    the norms), so each group's weight decay is put back as this run configured it; it gives every
    partition the same `step` tensor object, which Adam increments in place once per partition, so each
    partition gets its own copy; and it hands the state back as it was read (`step` on the CPU whatever
    device the parameters are on, which torch's fused AdamW cannot read on a GPU), so every state tensor is
    put where the optimizer wants it (`place_optimizer_state`)."""
    import torch

    from lvm.train.bad_steps import innermost_optimizer

    decay = [g.get("weight_decay") for g in optimizer.param_groups]
    path, client = engine.load_checkpoint(str(where[0]), tag=where[1])
    if path is None:
        raise ckpt.CheckpointError(f"could not load checkpoint {where[0] / where[1]}")
    for g, wd in zip(optimizer.param_groups, decay, strict=True):
        if wd is not None:
            g["weight_decay"] = wd
    for state in innermost_optimizer(optimizer).state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
    place_optimizer_state(optimizer)
    return client


def place_optimizer_state(optimizer) -> None:
    """Every state tensor of the optimizer that owns the parameter state (under DeepSpeed's wrappers) on the
    device, and in the dtype, the optimizer expects. For torch's own optimizers, what their `_init_group`
    makes and their `load_state_dict` restores: `step` a float32 tensor on the parameter's device where the
    group is fused or capturable, else a scalar on the CPU (float32, float64 under a float64 default dtype);
    the other floating state in the parameter's dtype, on its device. Other optimizers' state (DeepSpeed's,
    bitsandbytes' 8-bit blocks) only moves to the parameter's device: its dtypes are their own."""
    import torch
    from torch.optim.optimizer import _get_scalar_dtype

    from lvm.train.bad_steps import innermost_optimizer

    base = innermost_optimizer(optimizer)
    torch_own = type(base).__module__.startswith("torch.optim")
    for p, state in base.state.items():
        if not torch.is_tensor(p):
            continue
        # ZeRO-3 lists a partition in its group only while it steps: then the optimizer's defaults hold
        group = next((g for g in base.param_groups if any(q is p for q in g["params"])), base.defaults)
        on_device = bool(group.get("fused")) or bool(group.get("capturable"))
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            if torch_own and key == "step":
                want = (p.device, torch.float32) if on_device else (torch.device("cpu"), _get_scalar_dtype())
            elif torch_own and value.is_floating_point():
                want = (p.device, p.dtype)
            else:
                want = (p.device, value.dtype)
            if (value.device, value.dtype) != want:
                state[key] = value.to(device=want[0], dtype=want[1])


def describe(resume: Resume, step: int, world_size: int, opts, universal: bool) -> str:
    """The one log line of a resume: from where, and what changed."""
    s = resume.state
    line = f"resumed from {resume.ckpt_dir / resume.tag} at step {step}"
    if not universal:
        return line
    before = (f"micro batch {s.get('micro_batch', '?')} x accumulation {s.get('grad_accum', '?')} x "
              f"{resume.world_size} rank(s)")
    after = f"micro batch {opts.micro_batch} x accumulation {opts.grad_accum} x {world_size} rank(s)"
    windows = opts.micro_batch * opts.grad_accum * world_size
    return (f"{line}: written by {resume.world_size} rank(s), now {world_size}; weights and optimizer states "
            f"re-partitioned from {resume.tag}{ckpt.UNIVERSAL_SUFFIX}; {before} -> {after} = {windows} windows "
            f"({windows * opts.seq_len} tokens) per step, as before")
