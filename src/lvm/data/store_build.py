"""`make_shards.py --store`: the run that writes a token store (`lvm.data.store` says what it holds).

Every rank plans the whole store (`lvm.data.store_plan`: which unit encodes which image), then builds its own
unfinished units: decode the unit's images in the decode workers, encode them in batches, write its images file,
its records file and its part mark (last). Rank 0 (or `--index-only`) writes store.json, tokenizer.json and
report.json once every unit is finished.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from lvm.data.derive import DEFAULT_HOLE_RATIO, palette_for, palette_json
from lvm.data.offline.config import BuildConfig
from lvm.data.offline.decode import decode_pool, ordered_map, task_batches
from lvm.data.offline.encode import Encoder, check_geometry, encode_device
from lvm.data.offline.fit import resolve_tokenizer, tokenizer_info
from lvm.data.offline.sources import Skip
from lvm.data.offline.units import InputError, Unit, mine, plan_units
from lvm.data.offline.writer import (
    clear_unit,
    finished_parts,
    open_output,
    part_path,
    remove_temp_files,
    unit_record,
    write_tokenizer_json,
)
from lvm.data.shards.format import atomic_write_text
from lvm.data.store import (
    IMAGES_SCHEMA,
    PALETTES,
    RECORDS,
    RECORDS_SCHEMA,
    STORE_FORMAT,
    read_table,
    unit_files,
    usable,
    write_table,
)
from lvm.data.store_plan import UnitPlan, plan_store, refs_array
from lvm.data.store_records import decode_keys, key_palette, key_path
from lvm.model.vocab import TOKENS_PER_IMAGE

KEYS_PER_TASK = 16  # image keys per decode task


def ensure_palette(folder: Path, dataset: str) -> None:
    """Write the dataset's palette into the store the first time it is used (the same content from every rank)."""
    path = folder / f"{dataset}.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, palette_json(palette_for(dataset, folder)))


def encode_unit_images(plan: UnitPlan, cfg: BuildConfig, hole_ratio: float, encode, pool, bar,
                       palettes: Path) -> tuple[np.ndarray, dict[int, str]]:
    """The codes of the images a unit encodes (uint16 [images, 256], zeros where an image failed) and why each
    failed image (row -> reason) could not be made."""
    for dataset in sorted({d for d in map(key_palette, plan.keys) if d is not None}):
        ensure_palette(palettes, dataset)
    codes = np.zeros((len(plan.keys), TOKENS_PER_IMAGE), np.uint16)
    failed: dict[int, str] = {}
    rows: list[int] = []
    frames: list[np.ndarray] = []

    def flush():
        if frames:
            codes[rows] = encode(np.stack(frames))
            rows.clear()
            frames.clear()

    tasks = ((g, cfg.resize, cfg.seed, hole_ratio, str(palettes)) for g in task_batches(plan.keys, KEYS_PER_TASK))
    row = 0
    for results in ordered_map(pool, decode_keys, tasks, 2 * max(cfg.workers, 1) + 2):
        for frame, why in results:
            if frame is None:
                failed[row] = why
            else:
                rows.append(row)
                frames.append(frame)
            row += 1
            bar.update(1)
            if len(frames) >= cfg.batch_size:
                flush()
    flush()
    return codes, failed


def write_unit(out: Path, unit: Unit, plan: UnitPlan, codes: np.ndarray, failed: dict[int, str]) -> dict:
    """A unit's images (its keys and uint16 codes [n, 256], in row order) and records, then its part mark (last)."""
    images_file, records_file = unit_files(out, unit.name)
    flat = pa.array(codes.reshape(-1), type=pa.uint16())
    write_table(images_file, pa.table([pa.FixedSizeListArray.from_arrays(flat, TOKENS_PER_IMAGE),
                                       pa.array(plan.keys, pa.string())], schema=IMAGES_SCHEMA))
    rs, refs = plan.records, refs_array(plan)
    write_table(records_file, pa.table([
        pa.array([r.id for r in rs], pa.string()), pa.array([r.kind for r in rs], pa.string()),
        pa.array([r.group for r in rs], pa.string()), pa.array([r.dataset for r in rs], pa.string()),
        pa.array([r.line for r in rs], pa.int32()), pa.array(refs[:, 0]), pa.array(refs[:, 1])], schema=RECORDS_SCHEMA))
    part = {"unit": unit_record(unit), "input": unit.path, "plan": plan.digest, "image_first": plan.image_first,
            "images": len(plan.keys), "records": len(rs),
            "failed": [[row, plan.keys[row], why] for row, why in sorted(failed.items())],
            "skipped": [s.as_dict() for s in plan.skipped]}
    part_path(out, unit.name).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(part_path(out, unit.name), json.dumps(part, indent=1))
    return part


def finished_store_part(out: Path, unit: Unit, plan: UnitPlan) -> dict | None:
    """A unit's part report when it is finished under this plan; None otherwise."""
    p = part_path(out, unit.name)
    if not p.is_file():
        return None
    part = json.loads(p.read_text())
    done = (part.get("unit") == unit_record(unit) and part.get("plan") == plan.digest
            and all(f.is_file() for f in unit_files(out, unit.name)))
    return part if done else None


def _fingerprint(cfg: BuildConfig, hole_ratio: float) -> dict:
    keys = ("tokenizer", "resize", "seed", "fit_images", "part_bytes")
    return {"store": STORE_FORMAT, "hole_ratio": hole_ratio, **{k: getattr(cfg, k) for k in keys}}


def write_store_index(out: Path, units: list[Unit], plans: list[UnitPlan], tok_info: dict) -> dict | None:
    """store.json, tokenizer.json and report.json once every unit is finished; None while some are not."""
    by_name = {u.name: p for u, p in zip(units, plans, strict=True)}
    parts = finished_parts(out, units, lambda o, u: finished_store_part(o, u, by_name[u.name]))
    if parts is None:
        return None
    failed = {p["image_first"] + row: (key, why) for p in parts for row, key, why in p["failed"]}
    bad = np.array(sorted(failed), np.int64)
    totals: dict[str, dict[str, int]] = {"image": {}, "pair": {}}
    skipped: list[dict] = []
    for u, p in zip(units, parts, strict=True):
        skipped += p["skipped"]
        t = read_table(out / RECORDS / f"{u.name}.arrow")
        first, second = (t.column(c).to_numpy().astype(np.int64) for c in ("first", "second"))
        ok = usable(first, second, bad)
        for i in np.flatnonzero(~ok).tolist():
            key, why = failed[int(first[i])] if int(first[i]) in failed else failed[int(second[i])]
            line = t.column("line")[i].as_py()
            skipped.append(Skip(source=key_path(key), reason=why, sentence=t.column("id")[i].as_py(), line=line or None).as_dict())
        counts = t.filter(pa.array(ok)).group_by(["kind", "group"]).aggregate([("id", "count")]).to_pydict()
        for kind, group, n in zip(counts["kind"], counts["group"], counts["id_count"], strict=True):
            totals[kind][group] = totals[kind].get(group, 0) + n
    palettes = sorted(p.stem for p in (out / PALETTES).glob("*.json")) if (out / PALETTES).is_dir() else []
    records = sum(sum(k.values()) for k in totals.values())
    index = {"format": STORE_FORMAT, "tokenizer": tok_info, "units": [u.name for u in units],
             "unit_images": [p["images"] for p in parts], "unit_records": [p["records"] for p in parts],
             "images": sum(p["images"] for p in parts), "failed_images": bad.tolist(), "records": records,
             "categories": dict(sorted(totals["image"].items())), "tasks": dict(sorted(totals["pair"].items())),
             "palettes": palettes}
    report = {"written": {"images": index["images"] - len(bad), "records": records}, "failed_images": len(bad),
              "skipped_count": len(skipped), "skipped": skipped}
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
        ours = [] if cfg.index_only else mine(units, cfg.rank, cfg.world_size)
        plans = plan_store(units, {u.name for u in ours})
        by_name = {u.name: p for u, p in zip(units, plans, strict=True)}
        todo = [u for u in ours if finished_store_part(out, u, by_name[u.name]) is None]
        encode = Encoder(tok, device, cfg.batch_size)
        with tqdm(unit="image", desc=f"store[{cfg.rank}/{cfg.world_size}]", file=sys.stderr, dynamic_ncols=True,
                  disable=not cfg.progress or not todo) as bar:
            for unit in todo:
                plan = by_name[unit.name]
                clear_unit(out, unit.name)  # a dead run's part temp file
                for f in unit_files(out, unit.name):
                    f.unlink(missing_ok=True)
                codes, failed = encode_unit_images(plan, cfg, hole_ratio, encode, pool, bar, out / PALETTES)
                part = write_unit(out, unit, plan, codes, failed)
                stats["units"] += 1
                stats["images"] += part["images"] - len(failed)
                stats["records"] += part["records"]
    finally:
        if pool:
            pool.close()
            pool.join()
    index = write_store_index(out, units, plans, tok_info) if cfg.rank == 0 or cfg.index_only else None
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


__all__ = ["build_store", "run_store", "write_unit", "write_store_index", "store_summary", "encode_unit_images"]
