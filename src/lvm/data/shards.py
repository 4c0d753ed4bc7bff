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
sentences have each token length). Opening a folder (`open_shards`) reads no tokens: it takes the
counts from `index.json` (checking each listed file's size) or from that metadata, holds them as
a few numpy arrays (O(number of shards)), and memory-maps a shard only when something touches it,
keeping a bounded number open. Kinds are small integer codes (`KINDS`); ids are read only on
request. A shard written before the metadata existed is still read: its counts come from one
vectorised pass over it. `verify=True` (`--verify-data`) checks every token of every shard.
"""

from __future__ import annotations

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

from lvm.data.manifest import KINDS
from lvm.model.vocab import CODEBOOK_SIZE, TOKENS_PER_IMAGE

SCHEMA = pa.schema([
    pa.field("tokens", pa.list_(pa.uint16())),
    pa.field("n_images", pa.int32()),
    pa.field("kind", pa.string()),
    pa.field("id", pa.string()),
])
SPLITS = ("train", "val")
STATS_KEY = b"lvm.stats"
KIND_CODES = {k: i for i, k in enumerate(KINDS)}
OPEN_SHARDS = 32  # memory-mapped shards kept open per ShardSet (least recently used are closed)
READ_THREADS = 16  # threads reading per-shard sizes and headers at start-up


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


def shard_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"shard folder {folder} does not exist")
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise ShardError(f"shard folder {folder} holds no *.arrow files")
    return files


def _index_entries(folder: Path) -> dict[str, dict]:
    """index.json entries for the shards of `folder` (paths relative to the index's folder), by file name."""
    for cand in (folder / "index.json", folder.parent / "index.json"):
        if not cand.is_file():
            continue
        try:
            index = json.loads(cand.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{cand} is not valid JSON ({e}); run the index step of make_shards again") from None
        base = os.path.normpath(cand.parent.resolve())
        here = os.path.normpath(folder.resolve())
        out = {}
        for e in index.get("shards", []):
            full = os.path.normpath(os.path.join(base, e["path"]))
            if os.path.dirname(full) == here:
                out[os.path.basename(full)] = {**e, "_index": str(cand)}
        return out
    return {}


@dataclass(eq=False)
class ShardSet:
    """The shards of one folder: per-shard counts as arrays, shards memory-mapped on first touch.

    Sentence i of the set is sentence i - first[j] of shard j (files in name order).
    """

    folder: Path
    files: list[Path]
    sentences: np.ndarray   # int64 per shard
    tokens: np.ndarray      # int64 per shard (visual tokens, no BOS/EOS)
    images: np.ndarray      # int64 per shard
    max_token: np.ndarray   # int64 per shard (-1: empty)
    kind_counts: np.ndarray  # int64 [shards, len(KINDS)]
    scanned: int = 0        # shards whose counts came from a full pass (no recorded counts)
    capacity: int = OPEN_SHARDS
    _length_counts: list = field(default_factory=list, repr=False)
    _open: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self):
        self.first = np.zeros(len(self.files) + 1, np.int64)
        np.cumsum(self.sentences, out=self.first[1:])
        if not self._length_counts:
            self._length_counts = [None] * len(self.files)

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


def _recorded(path: Path, entry: dict | None) -> dict | None:
    """Counts of a shard without reading its tokens: from index.json (size checked) or its metadata."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e}") from None
    if entry is not None:
        if "bytes" in entry and int(entry["bytes"]) != size:
            raise ShardError(f"shard {path} has {size} bytes, {entry['_index']} says {entry['bytes']}: it changed after it "
                             "was indexed or was cut short (run make_shards again)")
        if all(k in entry for k in ("sentences", "tokens", "max_token")):
            return entry
    rec = read_recorded_stats(path)
    if rec is not None and entry is not None and int(entry.get("sentences", rec["sentences"])) != rec["sentences"]:
        raise ShardError(f"shard {path} records {rec['sentences']} sentences, {entry['_index']} says {entry['sentences']}")
    return rec


def open_shards(folder: str | Path, vocab_limit: int = CODEBOOK_SIZE, verify: bool = False,
                rank: int = 0, world: int = 1, capacity: int = OPEN_SHARDS) -> ShardSet:
    """The shards of `folder`, checked cheaply (sizes and recorded counts; ids < vocab_limit).

    With verify=True every token of every shard is read and checked (shards j with j % world == rank:
    ranks share the work). Raises ShardError with a one-line message naming the file.
    """
    folder = Path(folder)
    files = shard_files(folder)
    index = _index_entries(folder)
    present = {f.name for f in files}
    missing = sorted(set(index) - present)
    if missing:
        raise ShardError(f"shard {folder / missing[0]} is listed in {index[missing[0]]['_index']} but missing "
                         f"({len(missing)} missing in all)")
    n = len(files)
    sentences, tokens, images, max_token = (np.zeros(n, np.int64) for _ in range(4))
    kind_counts = np.zeros((n, len(KINDS)), np.int64)
    length_counts: list = [None] * n
    scanned = 0
    recorded = read_in_threads(lambda f: _recorded(f, index.get(f.name)), files)  # sizes, maybe headers
    for j, (f, rec) in enumerate(zip(files, recorded, strict=True)):
        if rec is None:  # a shard written before counts were recorded: one pass over it
            rec = Shard(f, random_access=False).scan()
            scanned += 1
        sentences[j], images[j] = int(rec["sentences"]), int(rec.get("images", 0))
        tokens[j] = int(rec["tokens"]) if "tokens" in rec else images[j] * TOKENS_PER_IMAGE
        max_token[j] = int(rec["max_token"])
        for k, c in (rec.get("kinds") or {}).items():
            if k not in KIND_CODES:
                raise ShardError(f"shard {f} has sentences of kind {k!r}, not one of {list(KINDS)}")
            kind_counts[j, KIND_CODES[k]] = int(c)
        if "length_counts" in rec and rec is index.get(f.name):  # from the index: kept (else read on demand)
            length_counts[j] = {int(k): int(v) for k, v in rec["length_counts"].items()}
        if max_token[j] >= vocab_limit:
            raise ShardError(f"shard {f} holds token id {max_token[j]} >= codebook size {vocab_limit}: "
                             "made by another tokenizer or corrupt")
        if tokens[j] != images[j] * TOKENS_PER_IMAGE:
            raise ShardError(f"shard {f}: {tokens[j]} tokens for {images[j]} images, not {TOKENS_PER_IMAGE} per image")
    shards = ShardSet(folder, files, sentences, tokens, images, max_token, kind_counts, scanned, capacity, length_counts)
    if verify:
        for j in range(rank, n, world):
            verify_shard(shards, j)
    return shards


def verify_shard(shards: ShardSet, j: int) -> None:
    """Every token of shard j against its recorded counts (`--verify-data`)."""
    f = shards.files[j]
    got = Shard(f, random_access=False).scan()
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
