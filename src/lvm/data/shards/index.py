"""`index.json`, what make_shards records of every shard (path, sentences, images, tokens, largest token id, bytes,
kinds, sentences per length), and `index.feather`, the same entries as Arrow columns beside it.

A rank reads the columns where they mirror the index.json beside them (its size and digest are in their metadata),
else parses the JSON; either way once per index for the folders opened together (`index_entries`' cache: a source's
train and val), equal count dicts shared, so 200,000 shards cost tens of MB.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from lvm.data.shards.format import ShardError, temp_path

INDEX_TABLE = "index.feather"  # index.json's shards as Arrow columns, beside it (what training reads at scale)
INDEX_OF = b"lvm.index_json"  # in index.feather's metadata: size and digest of the index.json it mirrors


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One shard of index.json, as training needs it (length and kind counts shared between equal shards)."""

    path: str
    sentences: int | None
    images: int | None
    tokens: int | None
    max_token: int | None
    kinds: dict | None
    length_counts: dict | None  # {token length (int): sentences}
    bytes: int | None
    index: str  # the index.json it came from

    @property
    def complete(self) -> bool:
        return self.sentences is not None and self.tokens is not None and self.max_token is not None

    def as_stats(self) -> dict:
        return {"sentences": self.sentences, "images": self.images or 0, "tokens": self.tokens,
                "max_token": self.max_token, "kinds": self.kinds or {}}


def write_index_table(index_json: Path, shards: list[dict]) -> None:
    """`index.feather` beside `index_json` (just written): its shard entries as columns (counts as JSON text), marked
    with index.json's size and digest, so a rank reads columns instead of parsing the JSON (200,000 shards: seconds
    of Python)."""
    cols = {k: pa.array([e.get(k) for e in shards], pa.int64()) for k in ("sentences", "images", "tokens", "max_token", "bytes")}
    table = pa.table({"path": pa.array([e["path"] for e in shards], pa.string()), **cols,
                      "kinds": pa.array([json.dumps(e.get("kinds"), sort_keys=True) for e in shards]).dictionary_encode(),
                      "length_counts": pa.array([json.dumps(e.get("length_counts"), sort_keys=True)
                                                 for e in shards]).dictionary_encode()})
    table = table.replace_schema_metadata({INDEX_OF: json.dumps(_index_mark(index_json))})
    path = index_json.with_name(INDEX_TABLE)
    tmp = temp_path(path)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    tmp.replace(path)


def _index_mark(index_json: Path) -> dict:
    """What identifies an index.json's content: its size and blake2b digest (read in large pieces, no parse)."""
    h = hashlib.blake2b(digest_size=16)
    size = 0
    with open(index_json, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
            size += len(block)
    return {"size": size, "blake2b": h.hexdigest()}


def _read_index_table(path: Path) -> list[IndexEntry] | None:
    """The entries of index.json from its `index.feather`, or None where there is none or it mirrors another index.json."""
    table_path = path.with_name(INDEX_TABLE)
    try:
        with pa.memory_map(str(table_path), "r") as source:
            table = pa.ipc.open_file(source).read_all()
        mark = json.loads((table.schema.metadata or {}).get(INDEX_OF, b"{}"))
        if mark != _index_mark(path):
            return None  # index.json was written again (or by hand) after it: the JSON is what counts
    except (OSError, pa.ArrowInvalid, ValueError):
        return None

    def decoded(name: str) -> list:
        col = table.column(name).combine_chunks()
        values = [json.loads(v) for v in col.dictionary.to_pylist()]  # each distinct count dict parsed once
        if name == "length_counts":
            values = [None if v is None else {int(k): int(c) for k, c in v.items()} for v in values]
        return [values[i] for i in col.indices.to_numpy(zero_copy_only=False).tolist()]

    nums = [table.column(k).to_pylist() for k in ("sentences", "images", "tokens", "max_token")]
    sizes = table.column("bytes").to_pylist()
    where = str(path)
    return [IndexEntry(p, a, b, c, d, k, lc, n, where) for p, a, b, c, d, k, lc, n
            in zip(table.column("path").to_pylist(), *nums, decoded("kinds"), decoded("length_counts"), sizes, strict=True)]


def parse_index(path: Path) -> dict[str, dict[str, IndexEntry]]:
    """index.json -> {folder (normalised absolute path): {file name: entry}}, in one parse: of its columns in
    `index.feather` where make_shards wrote them for this index.json, else of the JSON. The shard entries become
    `IndexEntry`s and equal count dicts one shared object, so 200,000 shards cost tens of MB."""
    shared: dict = {}
    as_int: dict = {}
    where = str(path)

    def hook(d: dict):
        if "path" in d and "sentences" in d and isinstance(d["path"], str):
            lc = d.get("length_counts")
            if lc is not None:
                key = id(lc)
                if key not in as_int:
                    as_int[key] = {int(k): int(v) for k, v in lc.items()}
                lc = as_int[key]

            def num(k):
                v = d.get(k)
                return None if v is None else int(v)

            return IndexEntry(d["path"], num("sentences"), num("images"), num("tokens"), num("max_token"),
                              d.get("kinds"), lc, num("bytes"), where)
        if d and all(type(v) is int for v in d.values()):  # counts (kinds, length_counts): one object per distinct one
            return shared.setdefault(tuple(d.items()), d)
        return d

    entries = _read_index_table(path)
    if entries is None:
        try:
            with open(path, encoding="utf-8") as fh:
                index = json.load(fh, object_hook=hook)
        except json.JSONDecodeError as e:
            raise ShardError(f"{path} is not valid JSON ({e}); run the index step of make_shards again") from None
        entries = index.get("shards", []) if isinstance(index, dict) else []
    base = os.path.normpath(path.parent.resolve())
    out: dict[str, dict[str, IndexEntry]] = {}
    for e in entries:
        if not isinstance(e, IndexEntry):
            continue
        full = os.path.join(base, e.path)
        if "/." in "/" + e.path or "//" in e.path:  # "train/x.arrow" needs no normalising (the base is normal)
            full = os.path.normpath(full)
        folder, name = os.path.split(full)
        out.setdefault(folder, {})[name] = e
    return out


def index_entries(folder: Path, cache: dict | None = None) -> dict[str, IndexEntry]:
    """index.json entries for the shards of `folder` (paths relative to the index's folder), by file name. The
    index is `folder/index.json` or `folder/../index.json`; `cache` (one dict for the folders opened together: a
    source's train and val) keeps each index parsed once."""
    for cand in (folder / "index.json", folder.parent / "index.json"):
        if not cand.is_file():
            continue
        key = str(cand.resolve())
        parsed = cache.get(key) if cache is not None else None
        if parsed is None:
            parsed = parse_index(cand)
            if cache is not None:
                cache[key] = parsed
        return parsed.get(os.path.normpath(folder.resolve()), {})
    return {}
