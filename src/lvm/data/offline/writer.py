"""What the offline stage writes: a unit's shards, its part mark, the settings of OUT, the index and report.

Unit u writes `train/<u>-NNNNN.arrow` and `val/<u>-NNNNN.arrow` (at most `sentences_per_shard` sentences
each; the split is a hash of the sentence id, chunks of one sentence stay together: `is_val`), then
`.parts/<u>.json`, the mark of a finished unit: its shards with their counts (sentences, images, tokens, max
token, bytes, kinds) and what it skipped. Before redoing an unfinished unit, what a dead run left of it
(shards and `.*.tmp.*` files) is removed (`clear_unit`). `.parts/settings.json` records the settings the
shards were made with; a rerun with other settings stops (`check_settings`).

Once every unit of the inputs is finished, `index.json` (every shard with its counts: what training needs
without opening the files, and its columns as `index.feather`) and `report.json` (totals and every skipped
source with its reason) are written (`write_index`); that step also removes temporary files of dead runs
everywhere under OUT. `summary_line` is what a run prints of it. The shard format itself is `lvm.data.shards`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import shutil
from pathlib import Path

from lvm.data.offline.units import Unit
from lvm.data.shards.format import SPLITS, atomic_write_text, read_recorded_stats, write_shard
from lvm.data.shards.index import write_index_table
from lvm.model.vocab import TOKENS_PER_IMAGE

PARTS = ".parts"
INDEX_FORMAT = "lvm-shards/2"


def is_val(sentence_id: str, fraction: float) -> bool:
    """The train/val split: a hash of the sentence id without its chunk suffix (`s#j`)."""
    base = sentence_id.split("#")[0].encode()
    return int(hashlib.sha1(base).hexdigest()[:12], 16) / 16**12 < fraction


# ----------------------------------------------------------------------------------------------
# The output folder and its settings


def open_output(out: Path, settings: dict, clear: bool, what: str = "shards") -> None:
    """OUT made (emptied first when `clear`), its settings recorded or checked (`check_settings`)."""
    if clear and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, settings, what)


def check_settings(out: Path, settings: dict, what: str = "shards") -> None:
    """Record the settings of a resumable output in .parts/settings.json, or refuse other settings (one line)."""
    f = out / PARTS / "settings.json"
    if f.is_file():
        old = json.loads(f.read_text())
        if old != settings:
            diff = sorted(k for k in set(settings) | set(old) if old.get(k) != settings.get(k))
            raise SystemExit(f"error: {out} holds {what} made with other settings ({', '.join(diff)} differ); "
                             "use another --out or pass --overwrite")
    else:
        f.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(f, json.dumps(settings, indent=2, sort_keys=True))


def write_tokenizer_json(out: Path, tok_info: dict) -> None:
    atomic_write_text(out / "tokenizer.json", json.dumps(tok_info, indent=2))


def remove_temp_files(out: Path) -> int:
    """Remove `.*.tmp.*` files and folders left by dead runs anywhere under OUT; returns the count."""
    n = 0
    for p in sorted(out.rglob(".*.tmp.*"), key=lambda q: -len(q.parts)):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


# ----------------------------------------------------------------------------------------------
# One unit: its shards and its part mark


def unit_files(out: Path, name: str) -> list[Path]:
    """Everything under train/ and val/ that belongs to unit `name` (shards, sidecars, temp files)."""
    pat = re.compile(rf"^\.?{re.escape(name)}-\d{{5}}\.")
    return [p for split in SPLITS if (out / split).is_dir() for p in (out / split).iterdir() if pat.match(p.name)]


def clear_unit(out: Path, name: str) -> None:
    """Remove what a dead run left of unit `name`: its shards and temp files, and its unfinished part mark."""
    for p in unit_files(out, name):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for p in (out / PARTS).glob(f".{glob.escape(name)}.json.tmp.*"):
        p.unlink(missing_ok=True)


class UnitOutput:
    """Rows of one unit, buffered per split and written as numbered shards."""

    def __init__(self, out: Path, name: str, per_shard: int):
        self.out, self.name, self.per_shard = out, name, per_shard
        self.rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
        self.count = {s: 0 for s in SPLITS}
        self.shards: list[dict] = []

    def add(self, split: str, row: dict) -> None:
        self.rows[split].append(row)
        if len(self.rows[split]) >= self.per_shard:
            self.flush(split)

    def flush(self, split: str) -> None:
        rows = self.rows[split]
        if not rows:
            return
        rel = f"{split}/{self.name}-{self.count[split]:05d}.arrow"
        nbytes = write_shard(self.out / rel, rows)
        # the counts write_shard recorded in the shard's metadata (length_counts included): what training reads
        self.shards.append({"path": rel, **read_recorded_stats(self.out / rel), "bytes": nbytes})
        self.count[split] += 1
        self.rows[split] = []

    def close(self) -> None:
        for split in SPLITS:
            self.flush(split)


def part_path(out: Path, name: str) -> Path:
    return out / PARTS / f"{name}.json"


def unit_record(unit: Unit) -> dict:
    """What a part mark says of its unit: a finished unit of other input is not finished."""
    return {"name": unit.name, "kind": unit.kind, "size": unit.size, "start": unit.start, "stop": unit.stop}


def write_part(out: Path, unit: Unit, shards: list[dict], skipped: list) -> dict:
    """The mark of a finished unit (written last, atomically): its shards and what it skipped."""
    part = {"unit": unit_record(unit), "input": unit.path, "shards": shards, "skipped": [s.as_dict() for s in skipped]}
    atomic_write_text(part_path(out, unit.name), json.dumps(part, indent=1))
    return part


def finished_part(out: Path, unit: Unit) -> dict | None:
    """The unit's part report if the unit is finished (same input, every shard present), else None."""
    p = part_path(out, unit.name)
    if not p.is_file():
        return None
    part = json.loads(p.read_text())
    done = part.get("unit") == unit_record(unit) and all((out / s["path"]).is_file() for s in part["shards"])
    return part if done else None


# ----------------------------------------------------------------------------------------------
# The index and the report


def finished_parts(out: Path, units: list[Unit], finished=finished_part) -> list[dict] | None:
    """The part report of every unit (`finished(out, unit)`), or None while some unit is not finished."""
    parts = []
    for u in units:
        part = finished(out, u)
        if part is None:
            return None
        parts.append(part)
    return parts


def write_index(out: Path, units: list[Unit], tok_info: dict) -> dict | None:
    """index.json + report.json once every unit is finished; None while some are not."""
    parts = finished_parts(out, units)
    if parts is None:
        return None
    totals = {split: {"sentences": 0, "images": 0, "tokens": 0, "shards": 0, "bytes": 0} for split in SPLITS}
    shards = {split: [] for split in SPLITS}
    skipped = []
    for p in parts:
        for s in p["shards"]:
            split = s["path"].split("/")[0]
            shards[split].append(s)
            t = totals[split]
            t["sentences"] += s["sentences"]
            t["images"] += s["images"]
            t["tokens"] += s["tokens"]
            t["shards"] += 1
            t["bytes"] += s["bytes"]
        skipped += p["skipped"]
    all_images = sum(t["images"] for t in totals.values())
    index = {"format": INDEX_FORMAT, "tokenizer": tok_info, "units": len(units),
             "shards": shards["train"] + shards["val"], "totals": totals}
    report = {"written": totals,
              "bytes_per_image": round(sum(t["bytes"] for t in totals.values()) / max(all_images, 1), 1),
              "skipped_count": len(skipped),
              "skipped_by_reason": _count_reasons(skipped),
              "skipped": skipped}
    write_tokenizer_json(out, tok_info)
    atomic_write_text(out / "index.json", json.dumps(index, indent=2))
    write_index_table(out / "index.json", index["shards"])  # its columns, what training reads at scale
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    remove_temp_files(out)  # every unit is finished: nothing is being written any more
    return report


def _count_reasons(skipped: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for s in skipped:
        key = re.split(r"[:(]", s["reason"].split(" member: ")[-1])[0].strip()
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def summary_line(s: dict) -> str:
    """One line of a run's summary (`pipeline.build_shards`): what it wrote, skipped, and how fast."""
    if s.get("fit_only"):
        return f"tokenizer ready: {s['tokenizer']} in {s['out']} ({s['tokenizer_seconds']:.1f}s); {s['units']} units to make"
    r = s["report"]
    run = s["this_run"]
    if r is None:
        return (f"rank done: {run['units']} units, {run['shards']} shards ({run['images']} images, "
                f"{s['images_per_s']:.0f} img/s); run the index step (--index-only) once all ranks finish")
    w = r["written"]
    sent = sum(t["sentences"] for t in w.values())
    imgs = sum(t["images"] for t in w.values())
    shards = sum(t["shards"] for t in w.values())
    return (f"wrote {sent} sentences ({imgs} images, {imgs * TOKENS_PER_IMAGE} tokens; train {w['train']['sentences']}, "
            f"val {w['val']['sentences']}) in {shards} shards from {s['units']} units to {s['out']}, "
            f"{r['bytes_per_image']} B/image; skipped {r['skipped_count']} (see report.json); this run "
            f"{run['images']} images in {s['seconds']:.1f}s = {s['images_per_s']:.0f} img/s "
            f"(+ {s['tokenizer_seconds']:.1f}s loading/fitting the tokenizer)")


__all__ = ["PARTS", "INDEX_FORMAT", "is_val", "open_output", "check_settings", "write_tokenizer_json",
           "remove_temp_files", "unit_files", "clear_unit", "UnitOutput", "part_path", "unit_record", "write_part",
           "finished_part", "finished_parts", "write_index", "summary_line"]
