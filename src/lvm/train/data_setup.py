"""Find and check the training/validation sources before any compute.

A source is a `--data` folder: a make_shards output folder (its `train/`, and `val/` for validation)
or a folder of `*.arrow` files (validation from `../val` when that exists). Every source of a mixture
must come from the same tokenizer (tokenizer.json in the folder or its parent). Opening a source reads
counts (index.json, shard metadata), not tokens, unless `--verify-data`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lvm.data.mixture import MixtureWindows
from lvm.data.packing import SourceWindows
from lvm.data.shards import ShardError, ShardSet, open_shards, read_tokenizer_info
from lvm.model.vocab import CODEBOOK_SIZE, TOKENS_PER_IMAGE


@dataclass
class Source:
    name: str
    root: Path
    train_dir: Path
    val_dir: Path | None
    train: ShardSet | None = None
    val: ShardSet | None = None


def resolve_data_dirs(data: str, val_data: str | None) -> tuple[Path, Path | None]:
    root = Path(data)
    if not root.exists():
        raise ShardError(f"--data {root} does not exist (run `make shards` first)")
    if not root.is_dir():
        raise ShardError(f"--data {root} is not a folder")
    train = root / "train" if (root / "train").is_dir() else root
    if val_data:
        val = Path(val_data)
        if not val.is_dir():
            raise ShardError(f"--val-data {val} does not exist")
        return train, val
    for cand in (root / "val", root.parent / "val"):
        if cand.is_dir() and cand.resolve() != train.resolve():
            return train, cand
    return train, None


def source_names(roots: list[Path]) -> list[str]:
    """Each source's folder name (a `train` folder is named after its parent); ties take more of the path."""
    parts = []
    for r in roots:
        p = r.resolve()
        if p.name in ("train", "val") and p.parent.name:
            p = p.parent
        parts.append(p.parts)
    seen = {}
    for k, p in enumerate(parts):
        if p in seen:
            raise ShardError(f"--data lists {roots[k]} twice (as {roots[seen[p]]})")
        seen[p] = k
    depth = [1] * len(parts)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        clash = {n for n in names if names.count(n) > 1}
        if not clash:
            return names
        for k, n in enumerate(names):
            if n in clash:
                depth[k] += 1


def check_tokenizer(train: Path, val: Path | None) -> dict:
    info = read_tokenizer_info(train)
    kind, _, rel = str(info.get("spec", "")).partition(":")
    base = train if (train / "tokenizer.json").is_file() else train.parent
    info["spec_resolved"] = f"{kind}:{(base / rel).resolve()}" if rel and not Path(rel).is_absolute() else info.get("spec")
    for key, want in (("codebook_size", CODEBOOK_SIZE), ("tokens_per_image", TOKENS_PER_IMAGE)):
        if info.get(key) != want:
            raise ShardError(f"{train}: tokenizer.json says {key}={info.get(key)}, this model expects {want}")
    if val is not None:
        vinfo = read_tokenizer_info(val)
        if vinfo.get("spec") != info.get("spec") or vinfo.get("details") != info.get("details"):
            raise ShardError(f"{val} was made by tokenizer {vinfo.get('spec')}, {train} by {info.get('spec')}: "
                             "train and validation shards must come from the same tokenizer")
    return info


def same_tokenizer(a: dict, b: dict) -> bool:
    return a.get("spec_resolved") == b.get("spec_resolved") and a.get("details") == b.get("details")


def resolve_sources(data: list[str], val_data: list[str] | None) -> tuple[list[Source], dict]:
    """The sources (folders checked, tokenizers equal); no shard is opened yet."""
    if val_data is not None and len(val_data) != len(data):
        raise ValueError(f"--val-data has {len(val_data)} folders for {len(data)} --data sources: give one per source")
    dirs = [resolve_data_dirs(d, val_data[k] if val_data else None) for k, d in enumerate(data)]
    names = source_names([Path(d) for d in data])
    sources = [Source(n, Path(d), t, v) for n, d, (t, v) in zip(names, data, dirs, strict=True)]
    infos = [check_tokenizer(s.train_dir, s.val_dir) for s in sources]
    for s, info in zip(sources[1:], infos[1:], strict=True):
        if not same_tokenizer(info, infos[0]):
            raise ShardError(f"source {s.name} ({s.root}) was made by tokenizer {info.get('spec_resolved')}, source "
                             f"{sources[0].name} by {infos[0].get('spec_resolved')}: every source of a mixture must "
                             "come from the same tokenizer (tokenizer.json)")
    return sources, infos[0]


def open_data(data: list[str] | str, val_data: list[str] | str | None = None, verify: bool = False,
              rank: int = 0, world: int = 1) -> tuple[list[Source], dict]:
    """Sources with their train (and val) shards opened; raises ShardError/ValueError with a one-line message."""
    data = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    val_data = [val_data] if isinstance(val_data, (str, os.PathLike)) else val_data
    sources, info = resolve_sources(data, val_data)
    for s in sources:
        s.train = open_shards(s.train_dir, CODEBOOK_SIZE, verify, rank, world)
        s.val = open_shards(s.val_dir, CODEBOOK_SIZE, verify, rank, world) if s.val_dir is not None else None
    return sources, info


def build_windows(sources: list[Source], seq_len: int, mode: str, seed: int, weights: list[float] | None) -> MixtureWindows:
    streams = [SourceWindows(s.train, seq_len, mode, seed, stream=k) for k, s in enumerate(sources)]
    return MixtureWindows(streams, [s.name for s in sources], weights)


def describe(shards: ShardSet) -> str:
    note = f"; {shards.scanned} shards had no recorded counts and were read in full" if shards.scanned else ""
    return shards.describe() + note
