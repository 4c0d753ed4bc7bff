"""The image-level token store: every image or (input, label) pair tokenized once, sentences composed later.

`make_shards.py --store` reads manifests whose lines are *records* (one image, or (input, label) pairs) and writes

    STORE/images/<unit>.arrow    one row per distinct image of the unit: tokens (256 x uint16), key (where it came from)
    STORE/records/<unit>.arrow   one row per record: id, kind ("image" | "pair"), group (category or task),
                                 dataset, first, second (rows of images/<unit>.arrow; second -1 for a single image)
    STORE/palettes/<dataset>.json  the palette each segmentation dataset was coloured with
    STORE/tokenizer.json, STORE/store.json (units and counts), STORE/report.json (every skipped record and why)

Both tables are Arrow IPC files (feather v2, read memory-mapped). Units of work, ranks, resume and the embedded
tokenizer's fit are those of make_shards (`lvm.data.offline`): unit u writes its two files and then
`.parts/<u>.json`, the mark of a finished unit; a rerun skips finished units; `store.json` is written once every
unit is finished (by rank 0, or `--index-only`). Within a unit an image used by several records (an input shared
by several tasks, a derived input and its label) is decoded and encoded once: its key names the file and how it
was made (`image:`, `colorization:`, `inpainting:<record id>:`, `segmentation:<dataset>:`, `depth:`, `normals:`).

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
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from lvm.data.derive import (
    DEFAULT_HOLE_RATIO,
    DERIVED,
    LABEL_MAPS,
    derive_input,
    label_frame,
    palette_for,
    palette_json,
)
from lvm.data.offline.config import BuildConfig
from lvm.data.offline.decode import decode_pool, ordered_map, task_batches
from lvm.data.offline.encode import Encoder, check_geometry, encode_device
from lvm.data.offline.fit import resolve_tokenizer, tokenizer_info
from lvm.data.offline.sources import Skip
from lvm.data.offline.sources.manifest import parse_line
from lvm.data.offline.units import InputError, Unit, mine, plan_units, read_lines
from lvm.data.offline.writer import (
    clear_unit,
    finished_parts,
    open_output,
    part_path,
    remove_temp_files,
    unit_record,
    write_tokenizer_json,
)
from lvm.data.shards import atomic_write_text, temp_path
from lvm.model.vocab import TOKENS_PER_IMAGE
from lvm.tokenizer.preprocess import SourceError, load_image

STORE_FORMAT = "lvm-store/1"
IMAGES, RECORDS, PALETTES = "images", "records", "palettes"
IMAGES_SCHEMA = pa.schema([pa.field("tokens", pa.list_(pa.uint16(), TOKENS_PER_IMAGE)), pa.field("key", pa.string())])
RECORDS_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("kind", pa.string()), pa.field("group", pa.string()),
                            pa.field("dataset", pa.string()), pa.field("first", pa.int32()), pa.field("second", pa.int32())])
RECORDS_PER_TASK = 8  # records per decode task


class StoreError(ValueError):
    """A store that cannot be read or composed from; the message is one line naming it."""


# ----------------------------------------------------------------------------------------------
# Records of a manifest


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
    sid, paths = sentence.id, sentence.images
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


# ----------------------------------------------------------------------------------------------
# Decoding an image key into a frame (decode workers run this)


@functools.lru_cache(maxsize=64)
def _palette(dataset: str, folder: str) -> np.ndarray:
    return palette_for(dataset, Path(folder))


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


def decode_key(key: str, resize: str, seed: int, hole_ratio: float, palettes: str, made: dict) -> np.ndarray:
    """The frame of one image key (uint8 [256, 256, 3]); `made` holds this task's frames (a derived input reuses
    its label's). Raises SourceError."""
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


def _decode_records(args) -> list:
    """Worker: records (and Skips passed through) -> per record (record, {key: frame}, {key: reason}) for the keys
    asked for: every key is tried, so a key that a later record shares is made or has its reason."""
    group, resize, seed, hole_ratio, palettes = args
    out = []
    for item in group:
        if isinstance(item, Skip):
            out.append(item)
            continue
        record, wanted = item
        made: dict = {}
        errors: dict = {}
        for k in wanted:
            try:
                decode_key(k, resize, seed, hole_ratio, palettes, made)
            except SourceError as e:
                errors[k] = str(e)
            except Exception as e:  # a decoder bug on a hostile file must not stop the run
                errors[k] = f"{type(e).__name__}: {e}"
        out.append((record, {k: made[k] for k in wanted if k in made}, errors))
    return out


# ----------------------------------------------------------------------------------------------
# One unit


def unit_files(out: Path, name: str) -> tuple[Path, Path]:
    return out / IMAGES / f"{name}.arrow", out / RECORDS / f"{name}.arrow"


def write_table(path: Path, table: pa.Table) -> int:
    """An Arrow IPC file (feather v2), atomically; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    tmp.replace(path)
    return path.stat().st_size


def finished_store_part(out: Path, unit: Unit) -> dict | None:
    p = part_path(out, unit.name)
    if not p.is_file():
        return None
    part = json.loads(p.read_text())
    done = part.get("unit") == unit_record(unit) and all(f.is_file() for f in unit_files(out, unit.name))
    return part if done else None


def _records_stream(unit: Unit, submitted: dict, palettes: Path):
    """Records of a unit as decode work: (record, keys not asked for before in this unit) or a Skip."""
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
            continue
        for r in item:
            if r.keys[-1].startswith("segmentation:"):
                ensure_palette(palettes, r.dataset)
            new = tuple(k for k in dict.fromkeys(r.keys) if k not in submitted)
            for k in new:
                submitted[k] = True
            yield r, new


def ensure_palette(folder: Path, dataset: str) -> None:
    """Write the dataset's palette into the store the first time it is used (the same content from every rank)."""
    path = folder / f"{dataset}.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, palette_json(palette_for(dataset, folder)))


def build_store_unit(unit: Unit, cfg: BuildConfig, hole_ratio: float, encode, pool, bar) -> dict:
    """Tokenize one unit's records into its images/records files; returns its part report (also in .parts/)."""
    out = Path(cfg.out)
    for f in unit_files(out, unit.name):
        f.unlink(missing_ok=True)
    palettes = out / PALETTES
    submitted: dict = {}
    rows: dict[str, int] = {}        # image key -> its row
    failed: dict[str, str] = {}      # image key -> why it could not be made
    keys: list[str] = []
    frames: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    records: list[Record] = []
    skipped: list[Skip] = []
    tasks = ((g, cfg.resize, cfg.seed, hole_ratio, str(palettes))
             for g in task_batches(_records_stream(unit, submitted, palettes), RECORDS_PER_TASK))
    for group in ordered_map(pool, _decode_records, tasks, 2 * max(cfg.workers, 1) + 2):
        for item in group:
            if isinstance(item, Skip):
                skipped.append(item)
                continue
            record, made, errors = item
            for k, frame in made.items():
                rows[k] = len(keys)
                keys.append(k)
                frames.append(frame)
            failed.update(errors)
            bad = next((k for k in record.keys if k not in rows), None)
            if bad is not None:
                skipped.append(Skip(source=key_path(bad), reason=failed.get(bad, "not decoded"), sentence=record.id,
                                    line=record.line or None))
                continue
            records.append(record)
            bar.update(1)
            if len(frames) >= cfg.batch_size:
                tokens.append(encode(np.stack(frames)))
                frames = []
    if frames:
        tokens.append(encode(np.stack(frames)))
    codes = np.concatenate(tokens) if tokens else np.zeros((0, TOKENS_PER_IMAGE), np.uint16)
    return write_unit(out, unit, keys, codes, records, skipped)


def write_unit(out: Path, unit: Unit, keys: list[str], codes: np.ndarray, records: list[Record], skipped: list) -> dict:
    """A unit's images (keys and uint16 codes [n, 256], in row order) and records, then its part mark (last)."""
    rows = {k: i for i, k in enumerate(keys)}
    images_file, records_file = unit_files(out, unit.name)
    flat = pa.array(codes.reshape(-1), type=pa.uint16())
    write_table(images_file, pa.table([pa.FixedSizeListArray.from_arrays(flat, TOKENS_PER_IMAGE),
                                       pa.array(keys, pa.string())], schema=IMAGES_SCHEMA))
    write_table(records_file, pa.table([
        pa.array([r.id for r in records], pa.string()), pa.array([r.kind for r in records], pa.string()),
        pa.array([r.group for r in records], pa.string()), pa.array([r.dataset for r in records], pa.string()),
        pa.array([rows[r.keys[0]] for r in records], pa.int32()),
        pa.array([rows[r.keys[1]] if len(r.keys) > 1 else -1 for r in records], pa.int32())], schema=RECORDS_SCHEMA))
    groups: dict[str, dict[str, int]] = {"image": {}, "pair": {}}
    for r in records:
        groups[r.kind][r.group] = groups[r.kind].get(r.group, 0) + 1
    part = {"unit": unit_record(unit), "input": unit.path, "images": len(keys), "records": len(records),
            "groups": {k: dict(sorted(v.items())) for k, v in groups.items()},
            "skipped": [s.as_dict() for s in skipped]}
    part_path(out, unit.name).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(part_path(out, unit.name), json.dumps(part, indent=1))
    return part


# ----------------------------------------------------------------------------------------------
# The run


def _fingerprint(cfg: BuildConfig, hole_ratio: float) -> dict:
    keys = ("tokenizer", "resize", "seed", "fit_images", "part_bytes")
    return {"store": STORE_FORMAT, "hole_ratio": hole_ratio, **{k: getattr(cfg, k) for k in keys}}


def write_store_index(out: Path, units: list[Unit], tok_info: dict) -> dict | None:
    """store.json, tokenizer.json and report.json once every unit is finished; None while some are not."""
    parts = finished_parts(out, units, finished_store_part)
    if parts is None:
        return None
    totals: dict[str, dict[str, int]] = {"image": {}, "pair": {}}
    for p in parts:
        for kind, groups in p["groups"].items():
            for g, n in groups.items():
                totals[kind][g] = totals[kind].get(g, 0) + n
    skipped = [s for p in parts for s in p["skipped"]]
    palettes = sorted(p.stem for p in (out / PALETTES).glob("*.json")) if (out / PALETTES).is_dir() else []
    index = {"format": STORE_FORMAT, "tokenizer": tok_info, "units": [u.name for u in units],
             "unit_images": [p["images"] for p in parts], "unit_records": [p["records"] for p in parts],
             "images": sum(p["images"] for p in parts), "records": sum(p["records"] for p in parts),
             "categories": dict(sorted(totals["image"].items())), "tasks": dict(sorted(totals["pair"].items())),
             "palettes": palettes}
    report = {"written": {"images": index["images"], "records": index["records"]}, "skipped_count": len(skipped),
              "skipped": skipped}
    write_tokenizer_json(out, tok_info)
    atomic_write_text(out / "store.json", json.dumps(index, indent=2))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    remove_temp_files(out)
    return index


def build_store(cfg: BuildConfig, hole_ratio: float = DEFAULT_HOLE_RATIO, overwrite: bool = False) -> dict:
    """make_shards --store: the store of cfg.inputs in cfg.out; returns a summary. SystemExit: one-line error."""
    cfg.check()
    if not 0 <= hole_ratio <= 1:
        raise SystemExit(f"error: --hole-ratio must be in [0, 1], got {hole_ratio}")
    out = Path(cfg.out)
    try:
        units = plan_units(cfg.inputs, cfg.part_bytes)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    open_output(out, _fingerprint(cfg, hole_ratio), clear=overwrite and cfg.rank == 0, what="a token store")
    pool = decode_pool(cfg.workers) if not cfg.index_only else None
    stats = {"units": 0, "images": 0, "records": 0}
    t0 = time.perf_counter()
    try:
        device = encode_device(cfg)
        tok = resolve_tokenizer(cfg, units, pool, device)
        check_geometry(tok)
        tok_info = tokenizer_info(tok, out, cfg)
        if cfg.rank == 0 and not cfg.index_only:
            write_tokenizer_json(out, tok_info)
        if cfg.fit_only:
            return {"out": str(out), "index": None, "this_run": stats, "seconds": 0.0, "fit_only": True}
        encode = Encoder(tok, device, cfg.batch_size)
        todo = [] if cfg.index_only else [u for u in mine(units, cfg.rank, cfg.world_size) if finished_store_part(out, u) is None]
        with tqdm(unit="record", desc=f"store[{cfg.rank}/{cfg.world_size}]", file=sys.stderr, dynamic_ncols=True,
                  disable=not cfg.progress or not todo) as bar:
            for unit in todo:
                clear_unit(out, unit.name)  # a dead run's part temp file (its images/records: build_store_unit)
                part = build_store_unit(unit, cfg, hole_ratio, encode, pool, bar)
                stats["units"] += 1
                stats["images"] += part["images"]
                stats["records"] += part["records"]
    finally:
        if pool:
            pool.close()
            pool.join()
    index = write_store_index(out, units, tok_info) if cfg.rank == 0 or cfg.index_only else None
    return {"out": str(out), "index": index, "this_run": stats, "seconds": time.perf_counter() - t0, "units": len(units)}


def store_summary(s: dict) -> str:
    if s.get("fit_only"):
        return f"tokenizer ready in {s['out']}"
    run = s["this_run"]
    idx = s["index"]
    if idx is None:
        return (f"rank done: {run['units']} units, {run['records']} records ({run['images']} images encoded); "
                "run the index step (--index-only) once all ranks finish")
    skipped = json.loads((Path(s["out"]) / "report.json").read_text())["skipped_count"]
    return (f"store {s['out']}: {idx['records']} records ({idx['images']} distinct images) from {s['units']} units; "
            f"tasks {idx['tasks']}, categories {len(idx['categories'])}; skipped {skipped} (see report.json); this run "
            f"{run['images']} images encoded in {s['seconds']:.1f}s")


def run_store(cfg: BuildConfig, hole_ratio: float, overwrite: bool) -> int:
    """What `make_shards.py --store` runs: build, print one summary line (or one error line); the exit code."""
    try:
        s = build_store(cfg, hole_ratio, overwrite)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(store_summary(s))
    if s["index"] is not None and s["index"]["records"] == 0:
        print("error: nothing was stored: every record was skipped (see report.json)", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# Reading a store


@dataclass
class Store:
    """A finished store: its records as columns (all units, in unit order) and its images memory-mapped per unit.

    Image g of the store is row g - image_first[u] of unit u's images file."""

    root: Path
    index: dict
    ids: list[str]
    kinds: np.ndarray       # object: "image" | "pair"
    groups: np.ndarray      # object
    datasets: np.ndarray    # object
    first: np.ndarray       # int64, global image index
    second: np.ndarray      # int64, global image index, -1 for single images
    image_first: np.ndarray  # int64 [units + 1]

    def keys(self) -> list[str]:
        return [k for u in self.index["units"] for k in _read_table(self.root / IMAGES / f"{u}.arrow").column("key").to_pylist()]

    def unit_tokens(self, u: int) -> np.ndarray:
        """uint16 [images of unit u, 256], a zero-copy view of the memory-mapped file."""
        col = _read_table(self.root / IMAGES / f"{self.index['units'][u]}.arrow").column("tokens")
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


def _read_table(path: Path) -> pa.Table:
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"corrupt or unreadable store file {path}: {e}") from None


def open_store(root: str | Path) -> Store:
    """A finished store (store.json present); StoreError with one line otherwise."""
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
        t = _read_table(root / RECORDS / f"{name}.arrow")
        if t.num_rows != index["unit_records"][u]:
            raise StoreError(f"store file {root / RECORDS / name}.arrow holds {t.num_rows} records, store.json says "
                             f"{index['unit_records'][u]}")
        for k in cols:
            v = t.column(k).to_numpy(zero_copy_only=False)
            if k in ("first", "second"):
                v = np.where(v >= 0, v.astype(np.int64) + image_first[u], -1)
            cols[k].append(v)
    cat = {k: (np.concatenate(v) if v else np.zeros(0, np.int64 if k in ("first", "second") else object)) for k, v in cols.items()}
    return Store(root, index, list(cat["id"]), cat["kind"], cat["group"], cat["dataset"], cat["first"].astype(np.int64),
                 cat["second"].astype(np.int64), image_first)


__all__ = ["Record", "Store", "StoreError", "parse_record_line", "iter_records", "build_store", "run_store", "write_unit",
           "write_store_index",
           "store_summary", "open_store", "STORE_FORMAT"]
