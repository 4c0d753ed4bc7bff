"""One shard memory-mapped for reading: its token buffer and offsets as zero-copy views.

Training's windows read token values at random places (`Shard.read`, `willneed`); evaluation and `--verify-data`
read sentences, lengths and kinds through the mapping (`sentence`, `lengths`, `kind_codes`, `scan`).
"""

from __future__ import annotations

import mmap
import os
import weakref
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvm.data.shards.format import KINDS, SCHEMA, ShardError, shard_stats
from lvm.model.vocab import TOKENS_PER_IMAGE


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
