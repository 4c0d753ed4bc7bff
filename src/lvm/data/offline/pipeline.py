"""make_shards: inputs -> units of work -> decoded frames -> visual codes -> Arrow shards + index.

1. Plan the units (`units.py`): every input shard (a webdataset tar, a JSONL manifest, a fixed-size part of a
   large manifest, an LVM token file) is one unit. Rank r of W (RANK/WORLD_SIZE, SLURM_PROCID/SLURM_NTASKS, or
   a job array's SLURM_ARRAY_TASK_ID/COUNT) takes units r, r+W, ... and reads no other unit's input.
2. The tokenizer (`fit.py`): loaded, or the embedded one fitted once before the units run; checked to make
   this pipeline's codes and recorded in `OUT/tokenizer.json`.
3. Each unit of this rank not yet finished: its source (`sources/`) read in order, frames decoded by worker
   processes (`decode.py`), encoded on the rank's device in batches (`encode.py`), rows written as the unit's
   shards and then its part mark (`writer.py`). LVM token files skip steps 2 and the decoding: their lines
   are codes already. A rerun skips finished units and clears what a dead run left of an unfinished one.
4. Once every unit is finished, the index and report (`writer.write_index`); with several ranks, run
   `--index-only` once at the end.

Output bytes depend only on the inputs and the settings (`config.OUTPUT_SETTINGS`), never on `--workers` or
the number of ranks.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from lvm.data.offline.config import BuildConfig
from lvm.data.offline.decode import decode_pool, decoded_stream
from lvm.data.offline.encode import Encoder, beside_decoders, check_geometry, encode_device, encode_rows
from lvm.data.offline.fit import resolve_tokenizer, tokenizer_info
from lvm.data.offline.sources import Skip
from lvm.data.offline.sources.lvm_jsonl import imported_tokenizer_info, lvm_token_rows
from lvm.data.offline.units import InputError, Unit, mine, plan_units
from lvm.data.offline.writer import (
    UnitOutput,
    clear_unit,
    finished_part,
    is_val,
    open_output,
    write_index,
    write_part,
    write_tokenizer_json,
)


def build_shards(cfg: BuildConfig, overwrite: bool = False) -> dict:
    """Run make_shards; returns a summary dict (`summary_line`). SystemExit with a one-line error on bad input."""
    cfg.check()
    out = Path(cfg.out)
    try:
        units = plan_units(cfg.inputs, cfg.part_bytes, "lvm-jsonl" if cfg.import_kind else None)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    open_output(out, cfg.settings(), clear=overwrite and cfg.rank == 0)
    t0 = time.perf_counter()
    pool = decode_pool(cfg.workers) if not cfg.index_only and cfg.import_kind is None else None
    stats = {"units": 0, "shards": 0, "images": 0, "sentences": 0}
    try:
        if cfg.import_kind is not None:  # LVM token files: the codes are the input
            device, tok_info, encode = None, cfg.tokenizer_info, None
        else:
            device = encode_device(cfg)
            tok = resolve_tokenizer(cfg, units, pool, device)
            check_geometry(tok)
            tok_info, encode = tokenizer_info(tok, out, cfg), Encoder(tok, device, cfg.batch_size)
        fit_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
        if cfg.rank == 0 and not cfg.index_only:
            write_tokenizer_json(out, tok_info)
        if cfg.fit_only:
            return {"out": str(out), "report": None, "this_run": stats, "seconds": 0.0, "tokenizer_seconds": fit_seconds,
                    "images_per_s": 0.0, "units": len(units), "tokenizer": tok_info["spec"], "fit_only": True}
        todo = [] if cfg.index_only else [u for u in mine(units, cfg.rank, cfg.world_size)
                                          if finished_part(out, u) is None]
        with beside_decoders(device, pool, cfg.workers), tqdm(
                unit="img", desc=f"shards[{cfg.rank}/{cfg.world_size}]", file=sys.stderr, dynamic_ncols=True,
                disable=not cfg.progress or not todo) as bar:
            for k, unit in enumerate(todo):
                bar.set_postfix_str(f"unit {k + 1}/{len(todo)} {unit.name}")
                part = build_unit(unit, cfg, encode, pool, bar)
                stats["units"] += 1
                stats["shards"] += len(part["shards"])
                stats["images"] += sum(s["images"] for s in part["shards"])
                stats["sentences"] += sum(s["sentences"] for s in part["shards"])
    finally:
        if pool:
            pool.close()
            pool.join()
    elapsed = time.perf_counter() - t0
    report = write_index(out, units, tok_info) if cfg.rank == 0 or cfg.index_only else None
    return {"out": str(out), "report": report, "this_run": stats, "seconds": elapsed, "tokenizer_seconds": fit_seconds,
            "images_per_s": stats["images"] / elapsed if elapsed > 0 else 0.0, "units": len(units),
            "tokenizer": tok_info["spec"]}


def build_unit(unit: Unit, cfg: BuildConfig, encode, pool, bar) -> dict:
    """Process one unit into its shards; returns its part report (also written to .parts/)."""
    out = Path(cfg.out)
    clear_unit(out, unit.name)
    output = UnitOutput(out, unit.name, cfg.sentences_per_shard)
    skipped: list[Skip] = []
    for rows in unit_rows(unit, cfg, encode, pool, bar, skipped):
        for r in rows:
            output.add("val" if is_val(r["id"], cfg.val_fraction) else "train", r)
    output.close()
    return write_part(out, unit, output.shards, skipped)  # the mark of a finished unit


def unit_rows(unit: Unit, cfg: BuildConfig, encode, pool, bar, skipped: list):
    """A unit's shard rows in order, in batches (decoded frames encoded `batch_size` at a time); its Skips are
    appended to `skipped`."""
    if unit.kind == "lvm-jsonl":
        for item in lvm_token_rows(unit, cfg.import_kind):
            if isinstance(item, Skip):
                skipped.append(item)
            else:
                bar.update(item["n_images"])
                yield [item]
        return
    pending, n_pending = [], 0
    for item in decoded_stream(unit, cfg, pool):
        if isinstance(item, Skip):
            skipped.append(item)
            bar.update(1)
            continue
        pending.append(item)
        n_pending += len(item[1])
        bar.update(len(item[1]))
        if n_pending >= cfg.batch_size:
            yield encode_rows(encode, pending)
            pending, n_pending = [], 0
    yield encode_rows(encode, pending)


def import_token_files(files: list[str], kind: str, out: str, tokenizer_spec: str | None = None, **settings) -> dict:
    """LVM token files -> shards in OUT (resumable, rank-sliced like make_shards)."""
    if not files:
        raise ValueError("give at least one --jsonl file")
    info = imported_tokenizer_info(tokenizer_spec, files[0], Path(out))
    cfg = BuildConfig(inputs=list(files), out=out, tokenizer=info["spec"], import_kind=kind, tokenizer_info=info,
                      workers=0, **settings)
    return build_shards(cfg)


__all__ = ["BuildConfig", "build_shards", "build_unit", "unit_rows", "import_token_files"]
