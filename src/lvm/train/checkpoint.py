"""Checkpoints: DeepSpeed's own format plus the run's state, one folder per step.

OUTPUT/checkpoints/
  run.json            what the checkpoints belong to (model, seq len, packing, ZeRO stage, global batch)
  latest              written by DeepSpeed only after every rank finished saving a tag
  step_00000100/      DeepSpeed tag: model/optimizer shards + client state (loader, RNG, step, config)
    run_state.json    written before DeepSpeed's files: step, world size, batch, schedule of the tag
  step_00000100_universal/   the tag re-partitionable for another world size (`lvm.train.elastic`)

A killed save never becomes "latest"; a folder of another run's checkpoints is refused. The world
size and the micro batch are not part of a run: another number of ranks resumes the same run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from lvm.artifacts import TAG_RE, CheckpointError, latest_tag

TAG_PREFIX = "step_"
UNIVERSAL_SUFFIX = "_universal"
RUN_STATE = "run_state.json"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def rng_state() -> dict:
    """This process's generators: Python's, NumPy's, torch's CPU one and its own CUDA device's (the current
    device only: another process may see other GPUs, or fewer, when it resumes)."""
    cuda = torch.cuda.get_rng_state(torch.cuda.current_device()) if torch.cuda.is_available() else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}


def gather_rng_states() -> dict:
    """Every rank's `rng_state()`, by rank: `{"ranks": [...]}` (a collective where a process group of several
    ranks is up). ZeRO-1/2 write the client state once, from rank 0, so each rank's own state travels in it."""
    import torch.distributed as dist

    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return {"ranks": [mine]}
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return {"ranks": states}


def set_rng_state(state: dict, rank: int = 0) -> None:
    """Restore rank `rank`'s generators from `gather_rng_states()` (or one `rng_state()`); the CUDA state goes to
    this process's current device. A rank the saving run did not have keeps its seeded generators. A checkpoint
    of an older version holds every GPU its process saw, by index: only the current device's entry is restored
    (none where the saving process saw fewer devices)."""
    if "ranks" in state:
        if rank >= len(state["ranks"]):
            return
        state = state["ranks"][rank]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if isinstance(cuda, (list, tuple)):
        if device >= len(cuda):
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(cuda, device)


VERSION_KEYS = ("transformers_version", "torch_version", "deepspeed_version")
# where a config came from or the dtype its file was stored in: not what the model is
PROVENANCE_KEYS = ("_name_or_path", "architectures", "torch_dtype", "dtype")


def comparable(identity: dict) -> dict:
    """The identity without library versions: an upgrade of transformers is not another run."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in VERSION_KEYS + PROVENANCE_KEYS}
        return v
    return strip(identity)


def write_json(path: Path, data) -> None:
    """Atomically: a temporary file in the same folder, then a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def check_run_identity(ckpt_dir: Path, identity: dict, write: bool) -> None:
    """Refuse a folder holding checkpoints of another run shape; record ours on first use.

    A key the record does not have (written by an older version) is not a difference; the record
    is then completed. Keys only the record has (world_size, micro_batch of older versions) are
    ignored: they no longer make another run."""
    f = ckpt_dir / "run.json"
    identity = comparable(identity)
    old = comparable(json.loads(f.read_text())) if f.is_file() else None
    if old is not None:
        diff = {k: (old[k], v) for k, v in identity.items() if k in old and old[k] != v}
        if diff:
            raise CheckpointError(f"{ckpt_dir} holds checkpoints of another run ("
                                  + ", ".join(f"{k}: {a} there, {b} here" for k, (a, b) in diff.items())
                                  + "); use another --output, or resume with the same settings")
    if write and (old is None or any(k not in old for k in identity)):
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json(f, {**(old or {}), **identity})


def write_run_state(tag_dir: Path, state: dict) -> None:
    """What a tag is (step, world size, batch, schedule), readable without loading a tensor. Written
    before DeepSpeed writes the tag, so a tag that 'latest' names always has it."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    write_json(tag_dir / RUN_STATE, state)


def read_run_state(ckpt_dir: Path, tag: str) -> dict:
    """The tag's run state; for tags written before run_state.json existed, what the files tell:
    the world size is the number of ZeRO optimizer partitions."""
    f = ckpt_dir / tag / RUN_STATE
    if f.is_file():
        return json.loads(f.read_text())
    parts = list((ckpt_dir / tag).glob("*zero_pp_rank_*_optim_states.pt"))
    return {"world_size": len(parts) or None}


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` tags (never the one 'latest' names), and the universal
    copies of tags that are gone or older than the newest."""
    latest = latest_tag(ckpt_dir)
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.fullmatch(p.name))
    for p in tags[:-keep_last] if keep_last > 0 else []:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.glob(f"{TAG_PREFIX}*{UNIVERSAL_SUFFIX}"):
        if p.is_dir() and p.name[: -len(UNIVERSAL_SUFFIX)] != latest:
            shutil.rmtree(p, ignore_errors=True)
