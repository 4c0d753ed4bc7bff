"""Arrow shards of visual sentences: the on-disk format shared by make_shards, training and eval.

A shard is an Arrow IPC *stream* file (`*.arrow`), the format `datasets.Dataset.from_file` reads
and memory-maps with zero copy. One row per visual sentence:

    tokens    list<uint16>   256 * n_images visual codes (no BOS/EOS: added when packing)
    n_images  int32
    kind      string         image | sequence | pairs | video
    id        string         the manifest's sentence id (chunks of long sentences: `id#j`)

A shard folder (`train/` or `val/`) sits beside `tokenizer.json` (what made the tokens),
`index.json` (every shard with its counts) and `report.json` (what was written and skipped).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lvm.model.vocab import CODEBOOK_SIZE, TOKENS_PER_IMAGE

SCHEMA = pa.schema([
    pa.field("tokens", pa.list_(pa.uint16())),
    pa.field("n_images", pa.int32()),
    pa.field("kind", pa.string()),
    pa.field("id", pa.string()),
])
SPLITS = ("train", "val")


class ShardError(Exception):
    """A shard folder or file that training/eval cannot use; the message names the file."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_shard(path: str | Path, rows: list[dict]) -> int:
    """Write rows ({tokens: uint16 array, n_images, kind, id}) atomically; returns bytes written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = [np.asarray(r["tokens"], dtype=np.uint16) for r in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(t) for t in tokens], out=offsets[1:])
    flat = np.concatenate(tokens) if tokens else np.zeros(0, np.uint16)
    batch = pa.record_batch([
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.uint16())),
        pa.array([r["n_images"] for r in rows], type=pa.int32()),
        pa.array([r["kind"] for r in rows], type=pa.string()),
        pa.array([r["id"] for r in rows], type=pa.string()),
    ], schema=SCHEMA)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_batch(batch)
    tmp.replace(path)
    return path.stat().st_size


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


@dataclass(frozen=True)
class SentenceTable:
    """All sentences of a shard folder as flat arrays (tokens stay memory-mapped)."""

    tokens: list[np.ndarray]   # per shard: the flat uint16 token buffer
    offsets: np.ndarray        # int64 [n_sentences + 1] over the concatenation of shards
    shard_of: np.ndarray       # int32 shard index of each sentence
    local_start: np.ndarray    # int64 start of each sentence within its shard buffer
    kinds: np.ndarray          # object array of kind strings
    ids: np.ndarray            # object array of ids
    n_images: np.ndarray
    files: list[Path]

    def __len__(self) -> int:
        return len(self.kinds)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sentence(self, i: int) -> np.ndarray:
        s = self.local_start[i]
        return self.tokens[self.shard_of[i]][s : s + self.offsets[i + 1] - self.offsets[i]]


def shard_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"shard folder {folder} does not exist")
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise ShardError(f"shard folder {folder} holds no *.arrow files")
    return files


def load_sentences(folder: str | Path, vocab_limit: int = CODEBOOK_SIZE) -> SentenceTable:
    """Open every shard in `folder`, checking ids < vocab_limit and lengths = 256 * n_images."""
    files = shard_files(folder)
    bufs, lens, shard_of, local, kinds, ids, nimg = [], [], [], [], [], [], []
    for k, f in enumerate(files):
        t = read_shard(f)
        col = t.column("tokens").combine_chunks()
        flat = col.values.to_numpy(zero_copy_only=True) if len(col) else np.zeros(0, np.uint16)
        off = col.offsets.to_numpy().astype(np.int64)
        if len(flat) and int(flat.max()) >= vocab_limit:
            raise ShardError(f"shard {f} holds token id {int(flat.max())} >= codebook size {vocab_limit}: "
                             "made by another tokenizer or corrupt")
        n = t.column("n_images").to_numpy()
        if not np.array_equal(np.diff(off), n.astype(np.int64) * TOKENS_PER_IMAGE):
            raise ShardError(f"shard {f}: sentence lengths are not {TOKENS_PER_IMAGE} x n_images")
        bufs.append(flat)
        lens.append(np.diff(off))
        local.append(off[:-1])
        shard_of.append(np.full(len(n), k, np.int32))
        kinds.extend(t.column("kind").to_pylist())
        ids.extend(t.column("id").to_pylist())
        nimg.append(n)
    lengths = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return SentenceTable(bufs, offsets, np.concatenate(shard_of), np.concatenate(local),
                         np.array(kinds, dtype=object), np.array(ids, dtype=object), np.concatenate(nimg), files)


def read_tokenizer_info(shards_root: str | Path) -> dict:
    """tokenizer.json beside (or one level above) a shard folder."""
    root = Path(shards_root)
    for cand in (root / "tokenizer.json", root.parent / "tokenizer.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    raise ShardError(f"no tokenizer.json in {root} or {root.parent}: cannot tell what made these tokens")
