"""Arrow shards of visual sentences: the on-disk format shared by make_shards, training and eval.

A shard is an Arrow IPC *stream* file (`*.arrow`), the format `datasets.Dataset.from_file` reads
and memory-maps with zero copy. One row per visual sentence:

    tokens    list<uint16>   256 * n_images visual codes (no BOS/EOS: added when packing)
    n_images  int32
    kind      string         image | sequence | pairs | video
    id        string         the manifest's sentence id (chunks of long sentences: `id#j`)

A shard folder (`train/` or `val/`) sits beside `tokenizer.json` (what made the tokens),
`index.json` (every shard with its counts) and `report.json` (what was written and skipped).

What training needs of a shard is recorded when it is written, in the schema's metadata
(key `lvm.stats`, JSON): sentences, tokens, images, max_token, kinds and `length_counts` (how many
sentences have each token length). Opening a folder (`open_shards`) reads no tokens and stats no
shard: one listing of the folder, `index.json` (parsed once for a source's train and val) and the
header of a shard only where the index lacks its counts. It holds the counts as a few numpy arrays
(O(number of shards)), memory-maps a shard only when something touches it, keeping a bounded number
open, and checks a shard's size against the index when it first opens it. Kinds are small integer codes (`KINDS`); ids are read only on
request. A shard written before the metadata existed is still read: its counts come from one
vectorised pass over it. `verify=True` (`--verify-data`) checks every token of every shard.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvm.model.vocab import CODEBOOK_SIZE, TOKENS_PER_IMAGE

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
OPEN_SHARDS = 32  # memory-mapped shards kept open per ShardSet (least recently used are closed)
READ_THREADS = 16  # threads reading per-shard sizes and headers at start-up
INDEX_TABLE = "index.feather"  # index.json's shards as Arrow columns, beside it (what training reads at scale)
INDEX_OF = b"lvm.index_json"  # in index.feather's metadata: size and digest of the index.json it mirrors


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


def _map(path: Path) -> tuple[mmap.mmap, pa.Table]:
    """Memory-map a shard with Python's mmap (so the token pages can be advised) and read it zero-copy."""
    try:
        with open(path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        table = pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(mm))).read_all()
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, ValueError) as e:
        raise ShardError(f"corrupt or unreadable shard {path}: {e}") from None
    if not table.schema.equals(SCHEMA):
        raise ShardError(f"shard {path} has schema {table.schema.names}, expected {SCHEMA.names}")
    return mm, table


class Shard:
    """One memory-mapped shard: flat token buffer and offsets as zero-copy numpy views.

    With random_access (training), windows read token values with `read` (pread on the file, repeated until
    every byte is read: a parallel file system may return a short read with more to come), not
    through the mapping: a window needs a few KB at random places, and pages read through a mapping
    stay mapped, so over an epoch a rank's resident set would grow to the size of every open shard
    (page cache, reclaimable, but counted). `willneed` asks for a window's pieces first, so cold reads
    overlap. The mapping's token pages are advised MADV_RANDOM (no MB-sized readahead per access) for
    the other readers (evaluation's `sentence`). The mapping goes with the last reference to it."""

    def __init__(self, path: Path, random_access: bool = True):
        self.path = path
        mm, table = _map(path)
        self.nbytes = len(mm)
        col = table.column("tokens")
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        self.table = table
        self.offsets = arr.offsets.to_numpy() if len(arr) else np.zeros(1, np.int32)
        self.values = arr.values.to_numpy(zero_copy_only=False) if len(arr) else np.zeros(0, np.uint16)
        self._fd, self._start = None, 0  # a descriptor for pread and where the token values start in the file
        if random_access and self.values.nbytes:
            start = arr.values.buffers()[1].address + arr.values.offset * 2 - pa.py_buffer(mm).address
            if 0 <= start < len(mm):  # the values live in the file (not a copy of combined chunks)
                if hasattr(mmap, "MADV_RANDOM"):
                    lo = start - start % mmap.PAGESIZE
                    mm.madvise(mmap.MADV_RANDOM, lo, min(len(mm), start + self.values.nbytes) - lo)
                self._fd, self._start = os.open(path, os.O_RDONLY), start
                weakref.finalize(self, os.close, self._fd)
        self.cache: dict = {}  # arrays derived from this shard (dropped with it)

    def read(self, x0: int, x1: int) -> np.ndarray:
        """Token values [x0, x1) of the flat buffer (pread with random_access, else a view of the mapping)."""
        if self._fd is None or x1 <= x0:
            return self.values[x0:x1]
        out = np.empty(x1 - x0, np.uint16)
        view = memoryview(out).cast("B")
        done = 0
        while done < len(view):  # a parallel file system (Lustre, NFS) may return fewer bytes than asked: go on
            got = os.preadv(self._fd, [view[done:]], self._start + 2 * x0 + done)
            if got == 0:  # end of file before the values end
                raise ShardError(f"shard {self.path}: short read at token {x0} ({done} of {out.nbytes} bytes): truncated?")
            done += got
        return out

    def willneed(self, a0: int, a1: int) -> None:
        """Start reading values[a0:a1] from storage now (asynchronously): a window's sentences lie at
        random places of a shard, and asked for together their reads overlap instead of queueing."""
        if self._fd is not None and a1 > a0:
            os.posix_fadvise(self._fd, self._start + 2 * a0, 2 * (a1 - a0), os.POSIX_FADV_WILLNEED)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sentence(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets.astype(np.int64))

    def n_images(self) -> np.ndarray:
        col = self.table.column("n_images")
        return col.chunk(0).to_numpy() if col.num_chunks == 1 else col.to_numpy()

    def kind_codes(self) -> np.ndarray:
        if "kinds" not in self.cache:
            codes = pc.index_in(self.table.column("kind"), value_set=pa.array(KINDS))
            if codes.null_count:
                bad = pc.filter(self.table.column("kind"), pc.is_null(codes))[0].as_py()
                raise ShardError(f"shard {self.path} has a sentence of kind {bad!r}, not one of {list(KINDS)}")
            self.cache["kinds"] = codes.to_numpy().astype(np.uint8)
        return self.cache["kinds"]

    def ids(self) -> list[str]:
        return self.table.column("id").to_pylist()

    def scan(self) -> dict:
        """Counts from every token (a full pass), for `--verify-data` and shards without recorded ones."""
        n_img = self.n_images()
        if not np.array_equal(self.lengths(), n_img.astype(np.int64) * TOKENS_PER_IMAGE):
            raise ShardError(f"shard {self.path}: sentence lengths are not {TOKENS_PER_IMAGE} x n_images")
        self.kind_codes()
        o0, o1 = int(self.offsets[0]), int(self.offsets[-1])
        return shard_stats(self.values[o0:o1], self.offsets, n_img, self.table.column("kind"))


def read_in_threads(fn, items: list, part: int = 256) -> list:
    """[fn(x) for x in items] on READ_THREADS threads, in parts: per-shard file reads are I/O bound."""
    if len(items) <= part:
        return [fn(x) for x in items]
    parts = [items[k : k + part] for k in range(0, len(items), part)]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return [y for ys in pool.map(lambda p: [fn(x) for x in p], parts) for y in ys]


def shard_names(folder: str | Path) -> list[str]:
    """Names of the `*.arrow` files of a folder, sorted: one listing of the folder, no stat per file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"shard folder {folder} does not exist")
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.name.endswith(".arrow") and not e.name.startswith("."))
    if not names:
        raise ShardError(f"shard folder {folder} holds no *.arrow files")
    return names


def shard_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return [folder / n for n in shard_names(folder)]


class ShardFiles:
    """The paths of a folder's shards, made when asked for (200,000 Path objects would be the largest per-shard state)."""

    def __init__(self, folder: Path, names: list[str]):
        self.folder, self.names = Path(folder), names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self.folder / n for n in self.names[j]]
        return self.folder / self.names[j]

    def __iter__(self):
        return (self.folder / n for n in self.names)


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


def _index_entries(folder: Path, cache: dict | None = None) -> dict[str, IndexEntry]:
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


@dataclass(eq=False)
class ShardSet:
    """The shards of one folder: per-shard counts as arrays, shards memory-mapped on first touch.

    Sentence i of the set is sentence i - first[j] of shard j (files in name order).
    """

    folder: Path
    files: ShardFiles | list[Path]
    sentences: np.ndarray   # int64 per shard
    tokens: np.ndarray      # int64 per shard (visual tokens, no BOS/EOS)
    images: np.ndarray      # int64 per shard
    max_token: np.ndarray   # int64 per shard (-1: empty)
    kind_counts: np.ndarray  # int64 [shards, len(KINDS)]
    scanned: int = 0        # shards whose counts came from a full pass (no recorded counts)
    capacity: int = OPEN_SHARDS
    _length_counts: list = field(default_factory=list, repr=False)
    _open: OrderedDict = field(default_factory=OrderedDict, repr=False)
    nbytes: np.ndarray | None = None  # int64 per shard: its size as index.json records it (-1: not recorded)
    index: str | None = None          # the index.json the counts came from

    def __post_init__(self):
        self.first = np.zeros(len(self.files) + 1, np.int64)
        np.cumsum(self.sentences, out=self.first[1:])
        if not self._length_counts:
            self._length_counts = [None] * len(self.files)
        if self.nbytes is None:
            self.nbytes = np.full(len(self.files), -1, np.int64)

    # --- per shard -------------------------------------------------------------------------
    @property
    def n_shards(self) -> int:
        return len(self.files)

    def shard(self, j: int) -> Shard:
        """Shard j, memory-mapped (kept among the `capacity` most recently used)."""
        s = self._open.get(j)
        if s is not None:
            self._open.move_to_end(j)
            return s
        s = Shard(self.files[j])
        if 0 <= self.nbytes[j] != s.nbytes:  # checked here, when the shard is first opened, not by a stat of every shard
            raise ShardError(f"shard {s.path} has {s.nbytes} bytes, {self.index} says {self.nbytes[j]}: it changed after it "
                             "was indexed or was cut short (run make_shards again)")
        if len(s) != self.sentences[j] or int(s.offsets[-1]) - int(s.offsets[0]) != self.tokens[j]:
            raise ShardError(f"shard {s.path} holds {len(s)} sentences and {int(s.offsets[-1]) - int(s.offsets[0])} tokens, "
                             f"recorded {self.sentences[j]} and {self.tokens[j]}: it changed after it was indexed "
                             "(run make_shards' index step again)")
        self._open[j] = s
        while len(self._open) > max(self.capacity, 1):
            self._open.popitem(last=False)
        return s

    def length_counts(self, j: int) -> dict[int, int]:
        """{token length: sentences} of shard j: recorded with the shard, else from its offsets.

        Not kept (a dict per shard would be the largest per-shard state): read again when needed."""
        lc = self._length_counts[j]
        if lc is None:
            rec = read_recorded_stats(self.files[j])
            if rec is not None and "length_counts" in rec:
                lc = {int(k): int(v) for k, v in rec["length_counts"].items()}
            else:  # an older shard: from its offsets (a Shard of its own: this may run in a reader thread)
                uniq, counts = np.unique(Shard(self.files[j], random_access=False).lengths(), return_counts=True)
                lc = {int(u): int(c) for u, c in zip(uniq, counts, strict=True)}
            if sum(lc.values()) != self.sentences[j]:
                raise ShardError(f"shard {self.files[j]}: its recorded length counts sum to {sum(lc.values())} sentences, "
                                 f"not {self.sentences[j]}")
        return lc

    # --- per sentence (evaluation, debugging) ------------------------------------------------
    def __len__(self) -> int:
        return int(self.first[-1])

    def locate(self, i: int) -> tuple[int, int]:
        j = int(np.searchsorted(self.first, i, side="right")) - 1
        return j, int(i - self.first[j])

    def sentence(self, i: int) -> np.ndarray:
        j, k = self.locate(i)
        return self.shard(j).sentence(k)

    def _concat(self, fn, dtype, limit: int | None = None) -> np.ndarray:
        """fn(shard) over the shards holding sentences 0..limit-1, concatenated (O(sentences): evaluation)."""
        limit = len(self) if limit is None else min(limit, len(self))
        last = int(np.searchsorted(self.first, limit, side="left"))
        parts = [fn(self.shard(j)) for j in range(last) if self.sentences[j]]
        out = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
        return out[:limit]

    def lengths(self, limit: int | None = None) -> np.ndarray:
        """Token length of sentences 0..limit-1 (int64)."""
        return self._concat(Shard.lengths, np.int64, limit)

    def kind_codes(self, limit: int | None = None) -> np.ndarray:
        """Kind of sentences 0..limit-1 as codes into KINDS (uint8)."""
        return self._concat(Shard.kind_codes, np.uint8, limit)

    def image_counts(self, limit: int | None = None) -> np.ndarray:
        return self._concat(Shard.n_images, np.int32, limit)

    @property
    def n_images(self) -> np.ndarray:
        return self.image_counts()

    @property
    def kinds(self) -> np.ndarray:
        return np.array(KINDS, dtype=object)[self.kind_codes()]

    @property
    def ids(self) -> np.ndarray:
        return np.array([x for j in range(self.n_shards) for x in self.shard(j).ids()], dtype=object)

    @property
    def offsets(self) -> np.ndarray:
        out = np.zeros(len(self) + 1, np.int64)
        np.cumsum(self.lengths(), out=out[1:])
        return out

    def describe(self) -> str:
        kinds = {k: int(c) for k, c in zip(KINDS, self.kind_counts.sum(0), strict=True) if c}
        return (f"{len(self)} sentences, {int(self.tokens.sum())} tokens in {self.n_shards} shard{'s' if self.n_shards != 1 else ''} "
                f"({json.dumps(kinds, sort_keys=True)})")


def _recorded(path: Path, entry: IndexEntry | None) -> dict | None:
    """Counts of a shard not (fully) in index.json, from its metadata (reads its header), checked against the entry."""
    rec = read_recorded_stats(path)
    if rec is not None and entry is not None and entry.sentences is not None and entry.sentences != rec["sentences"]:
        raise ShardError(f"shard {path} records {rec['sentences']} sentences, {entry.index} says {entry.sentences}")
    return rec


def open_shards(folder: str | Path, vocab_limit: int = CODEBOOK_SIZE, verify: bool = False,
                rank: int = 0, world: int = 1, capacity: int = OPEN_SHARDS, index_cache: dict | None = None) -> ShardSet:
    """The shards of `folder`, checked cheaply (recorded counts; ids < vocab_limit).

    Start-up reads one listing of the folder and index.json (parsed once per `index_cache`: pass one dict for the
    folders opened together), and the header of a shard only when the index lacks its counts: no stat of each
    shard. A shard's size is checked against the index when it is first opened (`ShardSet.shard`). With
    verify=True every token of every shard is read and checked (shards j with j % world == rank: ranks share
    the work). Raises ShardError with a one-line message naming the file.
    """
    folder = Path(folder)
    names = shard_names(folder)
    index = _index_entries(folder, index_cache)
    if index:
        present = set(names)
        missing = [n for n in index if n not in present]
        if missing:
            missing.sort()
            raise ShardError(f"shard {folder / missing[0]} is listed in {index[missing[0]].index} but missing "
                             f"({len(missing)} missing in all)")
    files = ShardFiles(folder, names)
    n = len(names)
    sentences, tokens, images, max_token = (np.zeros(n, np.int64) for _ in range(4))
    nbytes = np.full(n, -1, np.int64)
    kind_counts = np.zeros((n, len(KINDS)), np.int64)
    length_counts: list = [None] * n
    scanned = 0
    entries = [index.get(name) for name in names]
    need = [j for j, e in enumerate(entries) if e is None or not e.complete]  # unlisted shards, older indexes
    headers = dict(zip(need, read_in_threads(lambda j: _recorded(files[j], entries[j]), need), strict=True))
    kind_rows: dict = {}  # id of a (shared) kinds dict -> its row of counts
    for j, e in enumerate(entries):
        if j in headers:
            rec = headers[j]
            if rec is None:  # a shard written before counts were recorded: one pass over it
                rec = Shard(files[j], random_access=False).scan()
                scanned += 1
            sentences[j], images[j] = int(rec["sentences"]), int(rec.get("images", 0))
            tokens[j] = int(rec["tokens"]) if "tokens" in rec else images[j] * TOKENS_PER_IMAGE
            max_token[j] = int(rec["max_token"])
            kinds = rec.get("kinds") or {}
        else:
            sentences[j], images[j], tokens[j], max_token[j] = e.sentences, e.images or 0, e.tokens, e.max_token
            kinds = e.kinds or {}
            length_counts[j] = e.length_counts  # from the index: kept, shared between equal shards (else read on demand)
        if e is not None and e.bytes is not None:
            nbytes[j] = e.bytes
        row = kind_rows.get(id(kinds))
        if row is None:
            row = np.zeros(len(KINDS), np.int64)
            for k, c in kinds.items():
                if k not in KIND_CODES:
                    raise ShardError(f"shard {files[j]} has sentences of kind {k!r}, not one of {list(KINDS)}")
                row[KIND_CODES[k]] = int(c)
            if j not in headers:
                kind_rows[id(kinds)] = row
        kind_counts[j] = row
    bad = np.flatnonzero(max_token >= vocab_limit)
    if len(bad):
        j = int(bad[0])
        raise ShardError(f"shard {files[j]} holds token id {max_token[j]} >= codebook size {vocab_limit}: "
                         "made by another tokenizer or corrupt")
    bad = np.flatnonzero(tokens != images * TOKENS_PER_IMAGE)
    if len(bad):
        j = int(bad[0])
        raise ShardError(f"shard {files[j]}: {tokens[j]} tokens for {images[j]} images, not {TOKENS_PER_IMAGE} per image")
    where = next((e.index for e in entries if e is not None), None)
    shards = ShardSet(folder, files, sentences, tokens, images, max_token, kind_counts, scanned, capacity, length_counts,
                      nbytes=nbytes, index=where)
    if verify:
        for j in range(rank, n, world):
            verify_shard(shards, j)
    return shards


def verify_shard(shards: ShardSet, j: int) -> None:
    """Every token of shard j against its recorded counts (`--verify-data`)."""
    f = shards.files[j]
    shard = Shard(f, random_access=False)
    if 0 <= shards.nbytes[j] != shard.nbytes:
        raise ShardError(f"shard {f} has {shard.nbytes} bytes, {shards.index} says {shards.nbytes[j]}: it changed after it "
                         "was indexed or was cut short (run make_shards again)")
    got = shard.scan()
    want = {"sentences": int(shards.sentences[j]), "tokens": int(shards.tokens[j]), "images": int(shards.images[j]),
            "max_token": int(shards.max_token[j])}
    diff = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    if diff:
        raise ShardError(f"shard {f} does not match its recorded counts: "
                         + ", ".join(f"{k} {a} in the file, {b} recorded" for k, (a, b) in diff.items()))
    lc = shards.length_counts(j)
    if {int(k): v for k, v in got["length_counts"].items()} != lc:
        raise ShardError(f"shard {f}: sentence lengths do not match its recorded length counts")


def load_sentences(folder: str | Path, vocab_limit: int = CODEBOOK_SIZE) -> ShardSet:
    """All sentences of a shard folder (lazily memory-mapped); see `open_shards`."""
    return open_shards(folder, vocab_limit)


def read_tokenizer_info(shards_root: str | Path) -> dict:
    """tokenizer.json beside (or one level above) a shard folder."""
    root = Path(shards_root)
    for cand in (root / "tokenizer.json", root.parent / "tokenizer.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    raise ShardError(f"no tokenizer.json in {root} or {root.parent}: cannot tell what made these tokens")
