"""A folder of shards opened for training and evaluation: per-shard counts as arrays, shards opened on first touch.

Opening a folder (`open_shards`) reads no tokens and stats no shard: one listing of the folder, `index.json`
(parsed once for a source's train and val, `lvm.data.shards.index`) and the header of a shard only where the
index lacks its counts. It holds the counts as a few numpy arrays (O(number of shards)), memory-maps a shard only
when something touches it, keeping a bounded number open, and checks a shard's size against the index when it
first opens it. Ids are read only on request. A shard written before the metadata existed is still read: its
counts come from one vectorised pass over it. `verify=True` (`--verify-data`) checks every token of every shard.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lvm.data.shards.format import KIND_CODES, KINDS, ShardError, read_recorded_stats
from lvm.data.shards.index import IndexEntry, index_entries
from lvm.data.shards.shard import Shard
from lvm.model.vocab import CODEBOOK_SIZE, TOKENS_PER_IMAGE

OPEN_SHARDS = 32  # memory-mapped shards kept open per ShardSet (least recently used are closed)
READ_THREADS = 16  # threads reading per-shard sizes and headers at start-up


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
    index = index_entries(folder, index_cache)
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
