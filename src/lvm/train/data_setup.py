"""Find and check the training/validation shards before any compute."""

from __future__ import annotations

import json
from pathlib import Path

from lvm.data.shards import SentenceTable, ShardError, load_sentences, read_tokenizer_info
from lvm.model.vocab import CODEBOOK_SIZE, TOKENS_PER_IMAGE


def resolve_data_dirs(data: str, val_data: str | None) -> tuple[Path, Path | None]:
    root = Path(data)
    if not root.exists():
        raise ShardError(f"--data {root} does not exist (run `make shards` first)")
    train = root / "train" if (root / "train").is_dir() else root
    if val_data:
        return train, Path(val_data)
    for cand in (root / "val", root.parent / "val"):
        if cand.is_dir() and cand.resolve() != train.resolve():
            return train, cand
    return train, None


def check_tokenizer(train: Path, val: Path | None) -> dict:
    info = read_tokenizer_info(train)
    kind, _, rel = str(info.get("spec", "")).partition(":")
    if rel and not Path(rel).is_absolute():
        base = train if (train / "tokenizer.json").is_file() else train.parent
        info["spec_resolved"] = f"{kind}:{(base / rel).resolve()}"
    for key, want in (("codebook_size", CODEBOOK_SIZE), ("tokens_per_image", TOKENS_PER_IMAGE)):
        if info.get(key) != want:
            raise ShardError(f"{train}: tokenizer.json says {key}={info.get(key)}, this model expects {want}")
    if val is not None:
        vinfo = read_tokenizer_info(val)
        if vinfo.get("spec") != info.get("spec") or vinfo.get("details") != info.get("details"):
            raise ShardError(f"{val} was made by tokenizer {vinfo.get('spec')}, {train} by {info.get('spec')}: "
                             "train and validation shards must come from the same tokenizer")
    return info


def open_data(data: str, val_data: str | None) -> tuple[SentenceTable, SentenceTable | None, dict]:
    """(train, val or None, tokenizer info); raises ShardError with a one-line message naming the file."""
    train_dir, val_dir = resolve_data_dirs(data, val_data)
    info = check_tokenizer(train_dir, val_dir)
    train = load_sentences(train_dir, CODEBOOK_SIZE)
    val = load_sentences(val_dir, CODEBOOK_SIZE) if val_dir is not None else None
    return train, val, info


def describe(table: SentenceTable) -> str:
    kinds: dict[str, int] = {}
    for k in table.kinds:
        kinds[k] = kinds.get(k, 0) + 1
    return f"{len(table)} sentences, {int(table.lengths().sum())} tokens ({json.dumps(kinds, sort_keys=True)})"
