"""Find and check the training/validation sources before any compute.

A source is a `--data` folder: a make_shards output folder (its `train/`, and `val/` for validation)
or a folder of `*.arrow` files (validation from `../val` when that exists). Every source of a mixture
must come from the same tokenizer (tokenizer.json in the folder or its parent; `lvm.artifacts` says what
"the same" is). Opening a source reads counts (index.json, parsed once per source, or shard metadata), not
tokens, unless `--verify-data`, and stats no shard (`lvm.data.shards.shard_set.open_shards`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lvm.artifacts import TokenizerRecord
from lvm.data.mixture import MixtureWindows
from lvm.data.shards.format import ShardError
from lvm.data.shards.shard_set import ShardSet, open_shards
from lvm.data.windows.source import SourceWindows
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
    """The tokenizer record of a source (`lvm.artifacts.TokenizerRecord`), checked against this model's vocabulary
    and against its validation shards'. Returned as the run's tokenizer.json: the folder absolute (also as
    `spec_resolved`), the weights' digest filled in from the folder where an older file has none."""
    record = TokenizerRecord.from_shards(train)
    for key, want in (("codebook_size", CODEBOOK_SIZE), ("tokens_per_image", TOKENS_PER_IMAGE)):
        if getattr(record, key) != want:
            raise ShardError(f"{train}: tokenizer.json says {key}={getattr(record, key)}, this model expects {want}")
    if val is not None:
        why = TokenizerRecord.from_shards(val).mismatch(record, "train's")
        if why:
            raise ShardError(f"{val} was made by tokenizer {TokenizerRecord.from_shards(val).spec}, {train} by "
                             f"{record.spec} ({why}): train and validation shards must come from the same tokenizer")
    return {**record.with_digest().to_info(), "spec_resolved": record.spec}




def resolve_sources(data: list[str], val_data: list[str] | None) -> tuple[list[Source], dict]:
    """The sources (folders checked, tokenizers equal); no shard is opened yet."""
    if val_data is not None and len(val_data) != len(data):
        raise ValueError(f"--val-data has {len(val_data)} folders for {len(data)} --data sources: give one per source")
    dirs = [resolve_data_dirs(d, val_data[k] if val_data else None) for k, d in enumerate(data)]
    names = source_names([Path(d) for d in data])
    sources = [Source(n, Path(d), t, v) for n, d, (t, v) in zip(names, data, dirs, strict=True)]
    infos = [check_tokenizer(s.train_dir, s.val_dir) for s in sources]
    first = TokenizerRecord.from_info(infos[0])
    for s, info in zip(sources[1:], infos[1:], strict=True):
        why = TokenizerRecord.from_info(info).mismatch(first, f"{sources[0].name}'s")
        if why:
            raise ShardError(f"source {s.name} ({s.root}) was made by tokenizer {info.get('spec_resolved')}, source "
                             f"{sources[0].name} by {infos[0].get('spec_resolved')} ({why}): every source of a mixture "
                             "must come from the same tokenizer (tokenizer.json)")
    return sources, infos[0]


def open_data(data: list[str] | str, val_data: list[str] | str | None = None, verify: bool = False,
              rank: int = 0, world: int = 1) -> tuple[list[Source], dict]:
    """Sources with their train (and val) shards opened; raises ShardError/ValueError with a one-line message."""
    data = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    val_data = [val_data] if isinstance(val_data, (str, os.PathLike)) else val_data
    sources, info = resolve_sources(data, val_data)
    parsed: dict = {}  # each index.json parsed once (a source's train and val share one)
    for s in sources:
        s.train = open_shards(s.train_dir, CODEBOOK_SIZE, verify, rank, world, index_cache=parsed)
        s.val = open_shards(s.val_dir, CODEBOOK_SIZE, verify, rank, world, index_cache=parsed) if s.val_dir is not None else None
    return sources, info


def build_windows(sources: list[Source], seq_len: int, mode: str, seed: int, weights: list[float] | None) -> MixtureWindows:
    streams = [SourceWindows(s.train, seq_len, mode, seed, stream=k) for k, s in enumerate(sources)]
    return MixtureWindows(streams, [s.name for s in sources], weights)


def describe(shards: ShardSet) -> str:
    note = f"; {shards.scanned} shards had no recorded counts and were read in full" if shards.scanned else ""
    return shards.describe() + note
