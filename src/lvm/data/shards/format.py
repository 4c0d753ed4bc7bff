"""The shard file: an Arrow IPC *stream* file (`*.arrow`) of visual sentences, written atomically, read whole.

It is the format `datasets.Dataset.from_file` reads and memory-maps with zero copy. One row per visual sentence:

    tokens    list<uint16>   256 * n_images visual codes (no BOS/EOS: added when packing)
    n_images  int32
    kind      string         image | sequence | pairs | video
    id        string         the manifest's sentence id (chunks of long sentences: `id#j`)

A shard folder (`train/` or `val/`) sits beside `tokenizer.json` (what made the tokens),
`index.json` (every shard with its counts, `lvm.data.shards.index`) and `report.json` (what was written and skipped).

What training needs of a shard is recorded when it is written, in the schema's metadata
(key `lvm.stats`, JSON): sentences, tokens, images, max_token, kinds and `length_counts` (how many
sentences have each token length). Kinds are small integer codes when read (`KINDS`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA = pa.schema([
    pa.field("tokens", pa.list_(pa.uint16())),
    pa.field("n_images", pa.int32()),
    pa.field("kind", pa.string()),
    pa.field("id", pa.string()),
])
SPLITS = ("train", "val")
KINDS = ("image", "sequence", "pairs", "video")  # sentence kinds; a shard stores each as its code here
STATS_KEY = b"lvm.stats"
KIND_CODES = {k: i for i, k in enumerate(KINDS)}


class ShardError(Exception):
    """A shard folder or file that training/eval cannot use; the message names the file."""


def temp_path(path: Path) -> Path:
    """Where `path` is written before its atomic rename: `.<name>.tmp.<pid>` (a rerun removes dead runs' ones)."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = temp_path(path)
    tmp.write_text(text)
    tmp.replace(path)


def shard_stats(flat: np.ndarray, offsets: np.ndarray, n_images: np.ndarray, kinds: pa.Array) -> dict:
    """The counts recorded with a shard (and checked against it by `--verify-data`)."""
    lengths = np.diff(offsets.astype(np.int64))
    uniq, counts = np.unique(lengths, return_counts=True)
    kind_counts = pc.value_counts(kinds).to_pylist() if len(kinds) else []
    return {"sentences": int(len(lengths)), "tokens": int(lengths.sum()), "images": int(n_images.astype(np.int64).sum()),
            "max_token": int(flat.max()) if len(flat) else -1,
            "kinds": {d["values"]: int(d["counts"]) for d in sorted(kind_counts, key=lambda d: d["values"])},
            "length_counts": {str(int(u)): int(c) for u, c in zip(uniq, counts, strict=True)}}


def write_columns(path: str | Path, flat: np.ndarray, offsets: np.ndarray, n_images: np.ndarray,
                  kinds: pa.Array | list[str], ids: pa.Array | list[str]) -> int:
    """Write a shard from columns (flat uint16 tokens, int32 offsets [n+1], ...) atomically; returns bytes.

    The counts go into the schema's metadata. The file is written under `.<name>.tmp.<pid>` and renamed,
    so a finished shard always carries them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = np.ascontiguousarray(flat, dtype=np.uint16)
    offsets = np.ascontiguousarray(offsets, dtype=np.int32)
    n_images = np.ascontiguousarray(n_images, dtype=np.int32)
    kinds = kinds if isinstance(kinds, pa.Array) else pa.array(kinds, type=pa.string())
    ids = ids if isinstance(ids, pa.Array) else pa.array(ids, type=pa.string())
    stats = shard_stats(flat, offsets, n_images, kinds)
    schema = SCHEMA.with_metadata({STATS_KEY: json.dumps(stats, sort_keys=True).encode()})
    batch = pa.record_batch([pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.uint16())),
                             pa.array(n_images, type=pa.int32()), kinds, ids], schema=schema)
    tmp = temp_path(path)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    tmp.replace(path)
    return path.stat().st_size


def write_shard(path: str | Path, rows: list[dict]) -> int:
    """Write rows ({tokens: uint16 array, n_images, kind, id}) atomically; returns bytes written."""
    tokens = [np.asarray(r["tokens"], dtype=np.uint16) for r in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in tokens], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ShardError(f"shard {path}: {offsets[-1]} tokens do not fit one shard (< 2^31); write smaller shards")
    flat = np.concatenate(tokens) if tokens else np.zeros(0, np.uint16)
    return write_columns(path, flat, offsets, np.array([r["n_images"] for r in rows], dtype=np.int32),
                         [r["kind"] for r in rows], [r["id"] for r in rows])


def read_shard(path: str | Path) -> pa.Table:
    """Memory-map a shard (zero copy). Raises ShardError naming the file if it is unreadable."""
    path = Path(path)
    try:
        with pa.memory_map(str(path), "r") as source:
            table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise ShardError(f"corrupt or unreadable shard {path}: {e}") from None
    if not table.schema.equals(SCHEMA):
        raise ShardError(f"shard {path} has schema {table.schema.names}, expected {SCHEMA.names}")
    return table


def read_recorded_stats(path: Path) -> dict | None:
    """The counts in a shard's schema metadata (reads the schema only), or None for an older shard."""
    try:
        with pa.memory_map(str(path), "r") as source:
            schema = pa.ipc.open_stream(source).schema
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise ShardError(f"corrupt or unreadable shard {path}: {e}") from None
    if not schema.equals(SCHEMA):
        raise ShardError(f"shard {path} has schema {schema.names}, expected {SCHEMA.names}")
    raw = (schema.metadata or {}).get(STATS_KEY)
    return json.loads(raw) if raw else None
