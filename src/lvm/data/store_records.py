"""Manifest lines of a token store -> records, and image keys -> frames (`lvm.data.store` says what is stored).

Manifest lines (paths relative to the manifest, as in `lvm.data.offline.sources.manifest`; the keys below are
read only here):

    {"images": ["a.jpg"], "kind": "image", "category": "dog", "id": "..."}              a single image
    {"images": ["a.jpg"], "kind": "image", "derive": "colorization", "id": "..."}       a pair (grey a, a)
    {"images": ["x.jpg", "y.png"], "kind": "pairs", "task": "seg", "label": "segmentation", "dataset": "ade20k"}
    {"images": ["a.jpg", "b.jpg"], "kind": "sequence", "category": "dog"}              several images of a category

`derive` is "colorization" or "inpainting" (`lvm.data.derive`; the task is named after it unless "task" says
otherwise); `label` ("segmentation", "depth", "normals") says the label images are maps to colour (the palette is
the dataset's: "dataset", default the task). A pairs line may list several pairs (x1, y1, x2, y2, ...): pair j is
record `id#j`. Video lines and webdataset tars are reported as skipped: they are sentences, not records.

A record names its images by key: `how:path` with the path normalised (`a/../b.jpg` is `b.jpg`), so records of
any manifest that use the same file the same way share one image.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lvm.data.derive import DERIVED, LABEL_MAPS, derive_input, label_frame, palette_for
from lvm.data.offline.sources import Skip
from lvm.data.offline.sources.manifest import parse_line
from lvm.data.offline.units import Unit, read_lines
from lvm.tokenizer.preprocess import SourceError, load_image


@dataclass(frozen=True)
class Record:
    id: str
    kind: str                    # "image" | "pair"
    group: str                   # category (images) or task (pairs); "" for an image without a category
    dataset: str
    keys: tuple[str, ...]        # one (image) or two (input, label) image keys
    line: int = 0


def _text(entry: dict, key: str, default: str | None = None) -> str | None:
    v = entry.get(key, default)
    if v is not None and (not isinstance(v, str) or not v or "/" in v or ":" in v):
        raise ValueError(f"'{key}' must be a non-empty string without '/' or ':', got {v!r}")
    return v


def parse_record_line(entry, root: Path, line: int) -> list[Record]:
    """One decoded manifest line -> its records; raises ValueError with the reason."""
    if isinstance(entry, dict) and "video" in entry:
        raise ValueError("a video line is a sentence, not a record of the store: make sentence shards of it (no --store)")
    sentence = parse_line(entry, root, line, max_images=1 << 30)[0]
    derive, label = _text(entry, "derive"), _text(entry, "label")
    task, category = _text(entry, "task"), _text(entry, "category")
    if derive is not None and derive not in DERIVED:
        raise ValueError(f"'derive' must be one of {list(DERIVED)}, got {derive!r}")
    if label is not None and label not in LABEL_MAPS:
        raise ValueError(f"'label' must be one of {list(LABEL_MAPS)}, got {label!r}")
    sid, paths = sentence.id, [os.path.normpath(p) for p in sentence.images]
    if sentence.kind == "pairs":
        if derive or category:
            raise ValueError("a 'pairs' line takes 'task' (and 'label', 'dataset'), not 'derive' or 'category'")
        task = task or "pairs"
        dataset = _text(entry, "dataset", task)
        how = f"segmentation:{dataset}" if label == "segmentation" else label or "image"
        n = len(paths) // 2
        return [Record(sid if n == 1 else f"{sid}#{j}", "pair", task, dataset,
                       (f"image:{paths[2 * j]}", f"{how}:{paths[2 * j + 1]}"), line) for j in range(n)]
    if label is not None or task is not None and derive is None:
        raise ValueError(f"a {sentence.kind!r} line takes 'category' or 'derive'; 'task' and 'label' belong to pairs")
    if derive is not None:
        if sentence.kind != "image":
            raise ValueError("'derive' makes a pair of one image: use it on 'image' lines")
        task = task or derive
        made = f"inpainting:{_escape(sid)}" if derive == "inpainting" else derive
        return [Record(sid, "pair", task, _text(entry, "dataset", task), (f"{made}:{paths[0]}", f"image:{paths[0]}"), line)]
    dataset = _text(entry, "dataset", category or "images")
    return [Record(sid if len(paths) == 1 else f"{sid}#{j}", "image", category or "", dataset, (f"image:{p}",), line)
            for j, p in enumerate(paths)]


def iter_records(unit: Unit):
    """Per manifest line of a unit: its records, or a Skip naming the file and line. Ids are unique per unit."""
    path = Path(unit.path)
    root = path.parent.resolve()
    seen: set[str] = set()
    for n, _, raw in read_lines(unit):
        text = raw.strip()
        if not text:
            continue
        try:
            records = parse_record_line(json.loads(text.decode("utf-8")), root, n)
        except (ValueError, UnicodeDecodeError) as e:
            yield Skip(source=f"{path}:{n}", reason=f"malformed manifest line: {e}", line=n)
            continue
        base = records[0].id.split("#")[0]
        if base in seen:
            yield Skip(source=f"{path}:{n}", reason=f"duplicate id {records[0].id!r}", line=n)
            continue
        seen.add(base)
        yield records


def unit_records(unit: Unit):
    """Every record of a unit, in order, or a Skip for what cannot be one (a tar, a missing file, a bad line)."""
    if unit.kind == "tar":
        yield Skip(source=unit.path, reason="a webdataset tar holds sentences of single images, not records: "
                                            "make sentence shards of it (no --store)")
        return
    if not unit.exists:
        yield Skip(source=unit.path, reason="file not found")
        return
    for item in iter_records(unit):
        if isinstance(item, Skip):
            yield item
        else:
            yield from item


# ----------------------------------------------------------------------------------------------
# Image keys


def _escape(record_id: str) -> str:
    """A record id as one field of an image key (ids may hold ':')."""
    return record_id.replace("%", "%25").replace(":", "%3A")


def _unescape(field: str) -> str:
    return field.replace("%3A", ":").replace("%25", "%")


def key_path(key: str) -> str:
    """The file an image key reads (its last field: paths may hold ':')."""
    how, rest = key.split(":", 1)
    if how in ("inpainting", "segmentation"):
        rest = rest.split(":", 1)[1]
    return rest


def key_palette(key: str) -> str | None:
    """The dataset whose palette colours a segmentation key; None for other keys."""
    how, rest = key.split(":", 1)
    return rest.split(":", 1)[0] if how == "segmentation" else None


@functools.lru_cache(maxsize=64)
def _palette(dataset: str, folder: str) -> np.ndarray:
    return palette_for(dataset, Path(folder))


def decode_key(key: str, resize: str, seed: int, hole_ratio: float, palettes: str, made: dict) -> np.ndarray:
    """The frame of one image key (uint8 [256, 256, 3]); `made` holds frames made before (a derived input reuses
    its source's). Raises SourceError."""
    if key in made:
        return made[key]
    how, rest = key.split(":", 1)
    if how == "image":
        frame = load_image(rest, resize=resize)
    elif how in DERIVED:
        record_id = _unescape(rest.split(":", 1)[0]) if how == "inpainting" else ""
        frame = derive_input(how, decode_key(f"image:{key_path(key)}", resize, seed, hole_ratio, palettes, made),
                             seed, record_id, hole_ratio)
    elif how == "segmentation":
        dataset, path = rest.split(":", 1)
        frame = label_frame(path, how, _palette(dataset, palettes), resize)
    elif how in LABEL_MAPS:
        frame = label_frame(rest, how, None, resize)
    else:
        raise SourceError(f"unknown image key {key!r}")
    made[key] = frame
    return frame


def decode_keys(args) -> list:
    """Worker: image keys -> per key (frame, None) or (None, why it could not be made)."""
    keys, resize, seed, hole_ratio, palettes = args
    made: dict = {}
    out = []
    for k in keys:
        try:
            out.append((decode_key(k, resize, seed, hole_ratio, palettes, made), None))
        except SourceError as e:
            out.append((None, str(e)))
        except Exception as e:  # a decoder bug on a hostile file must not stop the run
            out.append((None, f"{type(e).__name__}: {e}"))
    return out


__all__ = ["Record", "parse_record_line", "iter_records", "unit_records", "key_path", "key_palette", "decode_key",
           "decode_keys"]
