"""Inputs of the offline stage and its units of work.

An input SPEC is one of:

- a JSONL manifest (`corpus/manifest.jsonl`);
- a folder: every `*.jsonl` manifest in it (sorted), or, if it holds none, every tar in it (`*.tar`,
  `*.tar.gz`, `*.tgz`);
- a webdataset tar (`laion/00000.tar`; gzipped: `laion/00000.tar.gz` or `.tgz`, read as a stream);
- a pattern with webdataset's brace notation and/or a glob: `laion/{00000..09999}.tar`, `laion/*.tar`,
  `{laion,coyo}/*.tar`. Braces are expanded first, then each result is globbed (sorted). A brace
  result without a glob that does not exist stays a unit and is reported as missing (a range of tars
  with a hole in it is normal for img2dataset output); a glob that matches nothing is an error.

The unit of work is one input shard: a tar, a manifest file, or a fixed-size byte range of one large
manifest (lines are assigned to the range their first byte lies in; a part reads its own range and
counts the newlines before it once, so its lines carry their line numbers in the file: default ids
and error reports do not depend on the part size). Unit u writes its own output shards, named from u;
rank r of W takes units
r, r + W, ... in the order of the inputs, and planning needs only a `stat` per input file.

A unit's name is its file name without the extension (`00000` for `laion/00000.tar`); names that
repeat across folders get their parent folders prefixed (`laion__00000`, `coyo__00000`), and manifest
parts get `.pNNNNN`. The name is part of every output file name and of the unit's part report. A unit's
label is its file's path below the common folder of all the inputs (`laion/00000.tar` and
`coyo/00000.tar` for those two; `00000.tar` when every input lies in one folder): webdataset sample ids
begin with it, so samples of equally named tars in different folders never share an id.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MANIFEST_SUFFIXES = (".jsonl", ".json")
DEFAULT_PART_BYTES = 64 << 20  # a manifest larger than this is cut into parts of this many bytes
_GLOB_CHARS = re.compile(r"[*?\[]")


class InputError(ValueError):
    """An input SPEC that names nothing usable; the message is one line naming it."""


@dataclass(frozen=True)
class Unit:
    name: str
    kind: str            # "tar" | "manifest" | "lvm-jsonl"
    path: str            # the input file (absolute)
    start: int = 0       # byte range of a manifest part: [start, stop); stop -1 = to the end
    stop: int = -1
    size: int = -1       # input size in bytes when planned (-1: the file does not exist)
    label: str = ""      # the file's path below the inputs' common folder (webdataset sample ids); "": its name

    @property
    def exists(self) -> bool:
        return self.size >= 0

    def describe(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "path": self.path, "size": self.size}
        if self.start or self.stop != -1:
            d.update(start=self.start, stop=self.stop)
        return d


def _kind_of(path: str) -> str:
    low = path.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    return "manifest"


def expand_spec(spec: str) -> list[str]:
    """SPEC -> input files in order (see the module docstring)."""
    if not spec:
        raise InputError("empty --input")
    files: list[str] = []
    for pattern in braceexpand(spec):
        if _GLOB_CHARS.search(pattern):
            hits = sorted(glob.glob(pattern))
            if not hits:
                raise InputError(f"--input {spec!r}: pattern {pattern!r} matches no file")
            files.extend(h for h in hits if os.path.isfile(h))
            continue
        p = Path(pattern)
        if p.is_dir():
            inner = sorted(str(q) for q in p.glob("*.jsonl")) or sorted(
                str(q) for q in p.iterdir() if q.is_file() and q.name.lower().endswith(TAR_SUFFIXES))
            if not inner:
                raise InputError(f"--input {spec!r}: folder {p} holds no *.jsonl manifest and no tar (*.tar, *.tar.gz, *.tgz)")
            files.extend(inner)
        elif p.is_file() or pattern != spec:
            files.append(pattern)  # a missing member of a brace range is reported, not fatal
        else:
            raise InputError(f"--input {spec!r}: no such file or folder")
    if not files:
        raise InputError(f"--input {spec!r} names no input file")
    return files


def _unique_names(paths: list[Path]) -> list[str]:
    """File stems, with parent folders prefixed (joined by '__') until every name is unique."""
    depth = 0
    while True:
        names = []
        for p in paths:
            parts = [*p.parent.parts[len(p.parent.parts) - depth:], p.name.split(".")[0]] if depth else [p.name.split(".")[0]]
            names.append("__".join(x for x in parts if x not in ("/", "")))
        if len(set(names)) == len(names) or depth > max(len(p.parts) for p in paths):
            break
        depth += 1
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[0]
        raise InputError(f"input file {dup!r} is given twice")
    return names


def plan_units(specs: list[str], part_bytes: int = DEFAULT_PART_BYTES, kind: str | None = None) -> list[Unit]:
    """Every unit of the given inputs, in order. `kind` forces the unit kind (e.g. "lvm-jsonl")."""
    if part_bytes < 1:
        raise InputError("--part-bytes must be >= 1")
    files: list[str] = []
    for spec in specs:
        files.extend(expand_spec(spec))
    paths = [Path(f).absolute() for f in files]
    names = _unique_names(paths)
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    units: list[Unit] = []
    for path, name in zip(paths, names, strict=True):
        label = path.relative_to(root).as_posix()
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        k = kind or _kind_of(str(path))
        if k == "tar" or size <= part_bytes:
            units.append(Unit(name, k, str(path), size=size, label=label))
            continue
        n_parts = -(-size // part_bytes)
        for j in range(n_parts):
            stop = -1 if j == n_parts - 1 else (j + 1) * part_bytes
            units.append(Unit(f"{name}.p{j:05d}", k, str(path), j * part_bytes, stop, size, label))
    return units


def read_lines(unit: Unit):
    """(line number in the file, byte offset, raw bytes) of every line whose first byte lies in the unit's range.

    A part after the first numbers its lines from the newlines before its first line (counted once, in
    large reads of the bytes before it: `LineNumbers`), so a line has the same number, hence the same
    default id (`line<N>`) and the same place in its error, however the file is cut into parts.
    """
    with open(unit.path, "rb") as f:
        pos = unit.start
        if pos > 0:
            f.seek(pos - 1)
            if f.read(1) != b"\n":  # we are mid-line: that line belongs to the previous part
                pos += len(f.readline())
        number = 1 if pos == 0 else None
        f.seek(pos)
        while unit.stop == -1 or pos < unit.stop:
            raw = f.readline()
            if not raw:
                break
            if number is None:  # only a part that holds a line pays for counting what lies before it
                number = LineNumbers(unit.path)(pos)
            yield number, pos, raw
            pos += len(raw)
            number += 1


class LineNumbers:
    """File line number of the line starting at a byte offset: one more than the newlines before it, counted when
    asked for. While the offsets asked for grow each byte of the file is counted at most once; nothing is read
    when nothing is asked."""

    def __init__(self, path: str):
        self.path, self.pos, self.line = path, 0, 1

    def __call__(self, offset: int) -> int:
        if offset < self.pos:
            self.pos, self.line = 0, 1
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            left = offset - self.pos
            while left > 0:
                chunk = f.read(min(left, 1 << 24))
                if not chunk:
                    break
                self.line += chunk.count(b"\n")
                left -= len(chunk)
        self.pos = offset
        return self.line


def mine(units: list[Unit], rank: int, world_size: int) -> list[Unit]:
    return units[rank::world_size]


__all__ = ["InputError", "Unit", "LineNumbers", "expand_spec", "plan_units", "read_lines", "mine", "DEFAULT_PART_BYTES"]
