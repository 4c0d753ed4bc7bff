"""The image-level token store: every distinct image tokenized once, sentences composed later (`lvm.data.compose`).

`make_shards.py --store` reads manifests whose lines are *records* (one image, or (input, label) pairs) and writes

    STORE/images/<unit>.arrow    one row per image that unit encodes: tokens (256 x uint16), key (how it was made)
    STORE/records/<unit>.arrow   one row per record of the unit's manifest lines: id, kind ("image" | "pair"),
                                 group (category or task), dataset, line, first, second (global image numbers;
                                 second -1 for a single image)
    STORE/palettes/<dataset>.json  the palette each segmentation dataset was coloured with
    STORE/tokenizer.json, STORE/store.json (units, counts, failed images), STORE/report.json (every skip and why)

Both tables are Arrow IPC files (feather v2, read memory-mapped). An image is named by its key: the resolved file
and how its pixels were made (`image:`, `colorization:`, `inpainting:<record id>:` (the mask's seed),
`segmentation:<dataset>:` (the palette), `depth:`, `normals:`; `lvm.data.store_records`). Every distinct key of
the whole store is encoded once, by the first unit (in input order) whose records use it: that unit's images file
holds it, and its global number is the row plus the images of all units before (`store.json` "unit_images").
Records of any unit point at images of their own or of earlier units.

Units of work, ranks, resume and the embedded tokenizer's fit are those of make_shards (`lvm.data.offline`);
`lvm.data.store_plan` is the first pass that gives every image its unit and number, and `lvm.data.store_build` the
run: unit u writes its two files and then `.parts/<u>.json`, the mark of a finished unit; a rerun skips finished
units; `store.json` is written once every unit is finished (by rank 0, or `--index-only`). An image that cannot be
made keeps its row (zero tokens) and is listed in `store.json` "failed_images"; records using it are skipped
(`report.json`) and `open_store` leaves them out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lvm.data.shards.format import temp_path
from lvm.model.vocab import TOKENS_PER_IMAGE

STORE_FORMAT = "lvm-store/2"
IMAGES, RECORDS, PALETTES = "images", "records", "palettes"
IMAGES_SCHEMA = pa.schema([pa.field("tokens", pa.list_(pa.uint16(), TOKENS_PER_IMAGE)), pa.field("key", pa.string())])
RECORDS_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("kind", pa.string()), pa.field("group", pa.string()),
                            pa.field("dataset", pa.string()), pa.field("line", pa.int32()), pa.field("first", pa.int64()),
                            pa.field("second", pa.int64())])


class StoreError(ValueError):
    """A store that cannot be read or composed from; the message is one line naming it."""


def unit_files(out: Path, name: str) -> tuple[Path, Path]:
    """A unit's images and records files."""
    return out / IMAGES / f"{name}.arrow", out / RECORDS / f"{name}.arrow"


def write_table(path: Path, table: pa.Table) -> int:
    """An Arrow IPC file (feather v2), atomically; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    tmp.replace(path)
    return path.stat().st_size


def read_table(path: Path) -> pa.Table:
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"corrupt or unreadable store file {path}: {e}") from None


@dataclass
class Store:
    """A finished store: its usable records as columns (all units, in unit order) and its images memory-mapped per
    unit. Image g of the store is row g - image_first[u] of unit u's images file."""

    root: Path
    index: dict
    ids: list[str]
    kinds: np.ndarray       # object: "image" | "pair"
    groups: np.ndarray      # object
    datasets: np.ndarray    # object
    first: np.ndarray       # int64, global image number
    second: np.ndarray      # int64, global image number, -1 for single images
    image_first: np.ndarray  # int64 [units + 1]

    def keys(self) -> list[str]:
        return [k for u in self.index["units"] for k in read_table(self.root / IMAGES / f"{u}.arrow").column("key").to_pylist()]

    def unit_tokens(self, u: int) -> np.ndarray:
        """uint16 [images of unit u, 256], a zero-copy view of the memory-mapped file."""
        col = read_table(self.root / IMAGES / f"{self.index['units'][u]}.arrow").column("tokens")
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        return arr.values.to_numpy(zero_copy_only=False).reshape(-1, TOKENS_PER_IMAGE)[: len(arr)]

    def gather(self, images: np.ndarray) -> np.ndarray:
        """Tokens of global images (sorted, unique) -> uint16 [len(images), 256]."""
        out = np.empty((len(images), TOKENS_PER_IMAGE), np.uint16)
        unit = np.searchsorted(self.image_first, images, side="right") - 1
        for u in np.unique(unit):
            sel = unit == u
            out[sel] = self.unit_tokens(int(u))[images[sel] - self.image_first[u]]
        return out

    def digest(self) -> str:
        return hashlib.blake2b((self.root / "store.json").read_bytes(), digest_size=16).hexdigest()


def usable(first: np.ndarray, second: np.ndarray, failed: np.ndarray) -> np.ndarray:
    """Which records have every image made (bool per record)."""
    return ~(np.isin(first, failed) | np.isin(second, failed))


def open_store(root: str | Path) -> Store:
    """A finished store (store.json present), without the records whose images failed; StoreError with one line
    otherwise."""
    root = Path(root)
    if not (root / "store.json").is_file():
        raise StoreError(f"{root} is not a finished token store (no store.json): run make_shards.py --store "
                         "(and its --index-only step after several ranks)")
    index = json.loads((root / "store.json").read_text())
    if index.get("format") != STORE_FORMAT:
        raise StoreError(f"{root}/store.json has format {index.get('format')!r}, expected {STORE_FORMAT!r}")
    image_first = np.zeros(len(index["units"]) + 1, np.int64)
    np.cumsum(index["unit_images"], out=image_first[1:])
    cols: dict[str, list] = {k: [] for k in ("id", "kind", "group", "dataset", "first", "second")}
    for u, name in enumerate(index["units"]):
        t = read_table(root / RECORDS / f"{name}.arrow")
        if t.num_rows != index["unit_records"][u]:
            raise StoreError(f"store file {root / RECORDS / name}.arrow holds {t.num_rows} records, store.json says "
                             f"{index['unit_records'][u]}")
        for k in cols:
            cols[k].append(t.column(k).to_numpy(zero_copy_only=False))
    cat = {k: (np.concatenate(v) if v else np.zeros(0, np.int64 if k in ("first", "second") else object)) for k, v in cols.items()}
    first, second = cat["first"].astype(np.int64), cat["second"].astype(np.int64)
    keep = usable(first, second, np.asarray(index["failed_images"], np.int64))
    return Store(root, index, [i for i, k in zip(cat["id"], keep, strict=True) if k], cat["kind"][keep],
                 cat["group"][keep], cat["dataset"][keep], first[keep], second[keep], image_first)


__all__ = ["Store", "StoreError", "open_store", "read_table", "write_table", "unit_files", "usable", "STORE_FORMAT",
           "IMAGES", "RECORDS", "PALETTES"]
