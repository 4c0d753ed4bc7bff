"""Checkpoints: DeepSpeed's own format plus the run's state, one folder per step.

OUTPUT/checkpoints/
  run.json            what the checkpoints belong to (world size, ZeRO stage, model, packing)
  latest              written by DeepSpeed only after every rank finished saving a tag
  step_00000100/      DeepSpeed tag: model/optimizer shards + client state (loader, RNG, step, config)

A killed save never becomes "latest"; a folder of another run's checkpoints is refused.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

TAG_PREFIX = "step_"


class CheckpointError(ValueError):
    pass


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


VERSION_KEYS = ("transformers_version", "torch_version", "deepspeed_version")


def comparable(identity: dict) -> dict:
    """The identity without library versions: an upgrade of transformers is not another run."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in VERSION_KEYS}
        return v
    return strip(identity)


def check_run_identity(ckpt_dir: Path, identity: dict, write: bool) -> None:
    """Refuse a folder holding checkpoints of another run shape; record ours on first use."""
    f = ckpt_dir / "run.json"
    identity = comparable(identity)
    if f.is_file():
        old = comparable(json.loads(f.read_text()))
        diff = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
        if diff:
            raise CheckpointError(f"{ckpt_dir} holds checkpoints of another run ("
                                  + ", ".join(f"{k}: {a} there, {b} here" for k, (a, b) in diff.items())
                                  + "); use another --output, or resume with the same settings")
    elif write:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(identity, indent=2, sort_keys=True))
        tmp.replace(f)


def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """(checkpoint folder, tag) to load, or None to start fresh."""
    if resume == "none":
        if latest_tag(ckpt_dir):
            raise CheckpointError(f"{ckpt_dir} already holds checkpoints and --resume none was given: "
                                  "use --resume auto to continue, or another --output")
        return None
    if resume == "auto":
        tag = latest_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    p = Path(resume)
    if (p / "latest").is_file():          # a checkpoints folder
        tag = latest_tag(p)
        if tag is None:
            raise CheckpointError(f"--resume {p}: 'latest' names a missing tag")
        return p, tag
    if (p / "checkpoints" / "latest").is_file():  # a run folder
        return resolve_resume(str(p / "checkpoints"), p / "checkpoints")
    if p.is_dir() and p.name.startswith(TAG_PREFIX):  # one tag folder
        return p.parent, p.name
    raise CheckpointError(f"--resume {p}: no DeepSpeed checkpoint there")


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` tags (never the one 'latest' names)."""
    latest = latest_tag(ckpt_dir)
    tags = sorted(p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir())
    for p in tags[:-keep_last] if keep_last > 0 else []:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)
