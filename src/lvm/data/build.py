"""make_shards: inputs -> units of work -> decoded frames -> visual codes -> Arrow shards.

Units (`lvm.data.units`). Every input shard (a webdataset tar, a JSONL manifest, a fixed-size part of
a large manifest, an LVM token file) is one unit. Unit u writes `train/<u>-NNNNN.arrow` and
`val/<u>-NNNNN.arrow` (at most `sentences_per_shard` sentences each; the split is a hash of the
sentence id, chunks of one sentence stay together), then `.parts/<u>.json`, the mark of a finished
unit: its shards with their counts (sentences, images, tokens, max token, bytes, kinds) and what it
skipped. Rank r of W (RANK/WORLD_SIZE, SLURM_PROCID/SLURM_NTASKS, or a job array's
SLURM_ARRAY_TASK_ID/COUNT) takes units r, r+W, ... and reads no other unit's input. A rerun skips
finished units and, before redoing an unfinished one, removes what a dead run left of it (shards and
`.*.tmp.*` files). Output bytes depend only on the inputs and the settings, never on `--workers` or
the number of ranks.

Tokenizer. The embedded patch-kmeans tokenizer is fitted once, as its own step (`--fit-only`, or
implicitly by a single-process run), on a deterministic sample across units: units in a seeded order,
the first train images of each, until `fit_images`; it is written to `OUT/tokenizer` atomically.
Ranks of a multi-rank run only load it. Each rank encodes on its own device (`cuda:LOCAL_RANK`
modulo the visible GPUs; the CPU without one); frames come from decode worker processes, in order,
through pinned memory when the device is a GPU.

Index. Once every unit of the inputs is finished, `index.json` (every shard with its counts: what
training needs without opening the files) and `report.json` (totals and every skipped source with
its reason) are written; with several ranks, run `--index-only` once at the end. That step also
removes temporary files of dead runs everywhere under OUT.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lvm.artifacts import TokenizerRecord
from lvm.data.decode import decode_task
from lvm.data.manifest import DEFAULT_MAX_IMAGES, KINDS, Sentence, Skip, iter_manifest_lines
from lvm.data.shards import (
    SPLITS,
    atomic_write_text,
    read_recorded_stats,
    temp_path,
    write_index_table,
    write_shard,
)
from lvm.data.units import DEFAULT_PART_BYTES, InputError, Unit, plan_units, read_lines
from lvm.data.webdataset import Sample, iter_samples
from lvm.model.vocab import CODEBOOK_SIZE, IMAGE_SIZE, TOKENS_PER_IMAGE
from lvm.tokenizer import load_tokenizer, parse_spec
from lvm.tokenizer.patch_kmeans import PatchKMeansTokenizer
from lvm.tokenizer.preprocess import RESIZE_MODES

PARTS = ".parts"
INDEX_FORMAT = "lvm-shards/2"
LINES_PER_TASK = 4      # manifest lines per decode task
SAMPLES_PER_TASK = 16   # webdataset samples per decode task


@dataclass
class BuildConfig:
    inputs: list[str] = field(default_factory=list)
    out: str = "data/shards"
    tokenizer: str = "patch-kmeans"
    workers: int = 2
    batch_size: int = 64
    val_fraction: float = 0.05
    sentences_per_shard: int = 8192
    max_images: int = DEFAULT_MAX_IMAGES
    resize: str = "squash"
    seed: int = 0
    fit_images: int = 2048
    part_bytes: int = DEFAULT_PART_BYTES
    rank: int = 0
    world_size: int = 1
    index_only: bool = False
    fit_only: bool = False
    device: str | None = None
    progress: bool = True
    import_kind: str | None = None       # LVM token files: the kind of their sentences
    tokenizer_info: dict | None = None   # LVM token files: what made the tokens

    def check(self) -> None:
        if not self.inputs:
            raise ValueError("give at least one --input")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 0 or self.batch_size < 1 or self.sentences_per_shard < 1:
            raise ValueError("--workers must be >= 0, --batch-size and --sentences-per-shard >= 1")
        if self.max_images < 2:
            raise ValueError("--max-images must be at least 2")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"--resize must be one of {RESIZE_MODES}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.import_kind is not None and self.import_kind not in KINDS:
            raise ValueError(f"--kind must be one of {list(KINDS)}, got {self.import_kind!r}")
        if self.import_kind is None:
            parse_spec(self.tokenizer)


def is_val(sentence_id: str, fraction: float) -> bool:
    base = sentence_id.split("#")[0].encode()
    return int(hashlib.sha1(base).hexdigest()[:12], 16) / 16**12 < fraction


# ----------------------------------------------------------------------------------------------
# Work items of a unit and their decoding


def _task_batches(items, size: int):
    batch = []
    for it in items:
        batch.append(it)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def ordered_map(pool, fn, tasks, inflight: int):
    """fn over tasks in a process pool, results in order, at most `inflight` tasks pending
    (Pool.imap would read the whole input ahead into memory)."""
    if pool is None:
        yield from map(fn, tasks)
        return
    pending: deque = deque()
    for t in tasks:
        pending.append(pool.apply_async(fn, (t,)))
        if len(pending) >= inflight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def decoded_stream(unit: Unit, cfg: BuildConfig, pool):
    """Per sentence of a unit, in order: (Sentence, frames) or a Skip."""
    inflight = 2 * max(cfg.workers, 1) + 2
    if unit.kind == "tar":
        tasks = ((g, cfg.resize) for g in _task_batches(iter_samples(unit.path, unit.label), SAMPLES_PER_TASK))
        for group in ordered_map(pool, _decode_samples, tasks, inflight):
            yield from group
        return
    if not unit.exists:
        yield Skip(source=unit.path, reason="file not found")
        return
    lines = iter_manifest_lines(read_lines(unit), Path(unit.path), cfg.max_images)
    tasks = ((g, cfg.resize) for g in _task_batches(lines, LINES_PER_TASK))
    for group in ordered_map(pool, _decode_lines, tasks, inflight):
        yield from group


def _decode_samples(args) -> list:
    """Worker: webdataset samples (and Skips passed through) -> (Sentence, frames) or Skip."""
    group, resize = args
    out = []
    todo = [(i, it) for i, it in enumerate(group) if isinstance(it, Sample)]
    results = decode_task(("images", [(it.key, it.image()[1]) for _, it in todo], resize))
    by_index = dict(zip((i for i, _ in todo), results, strict=True))
    for i, it in enumerate(group):
        if isinstance(it, Skip):
            out.append(it)
            continue
        tar = it.tar_path
        sid = it.id
        res = by_index[i]
        if isinstance(res, tuple):
            out.append(Skip(source=tar, key=it.key, sentence=sid, reason=f"{it.image()[0]} member: {res[1]}"))
        else:
            out.append((Sentence(id=sid, kind="image", images=(f"{tar}:{it.key}",)), res))
    return out


def _decode_lines(args) -> list:
    """Worker: manifest lines (chunk lists, and Skips passed through) -> (Sentence, frames) or Skip."""
    group, resize = args
    out = []
    for it in group:
        if isinstance(it, Skip):
            out.append(it)
            continue
        for chunk, res in zip(it, decode_task(("lines", [it], resize))[0], strict=True):
            if res is None:
                continue  # past the end of a video
            if isinstance(res, tuple):
                out.append(Skip(source=res[0], reason=res[1], sentence=chunk.id, line=chunk.line or None))
            else:
                out.append((chunk, res))
    return out


# ----------------------------------------------------------------------------------------------
# LVM token files (JSONL, {"tokens": base64 of int32 codes} per line): rows without tokenizing


def lvm_token_rows(unit: Unit, kind: str):
    """Per line of an LVM token file: a row for a shard, or a Skip naming the file and line."""
    import base64
    import binascii

    if not unit.exists:
        yield Skip(source=unit.path, reason="file not found")
        return
    name = Path(unit.path).name
    for n, _, raw in read_lines(unit):  # n: the line's number in the file, in every part of it
        text = raw.strip()
        if not text:
            continue
        sid = f"{name}:{n}"
        try:
            entry = json.loads(text.decode("utf-8"))
            if not isinstance(entry, dict) or not isinstance(entry.get("tokens"), str):
                raise ValueError("line is not a JSON object with a base64 string 'tokens'")
            data = base64.b64decode(entry["tokens"], validate=True)
            if len(data) % 4:
                raise ValueError(f"'tokens' decodes to {len(data)} bytes, not a whole number of int32")
            codes = np.frombuffer(data, dtype="<i4")
            if len(codes) == 0 or len(codes) % TOKENS_PER_IMAGE:
                raise ValueError(f"{len(codes)} tokens is not a positive multiple of {TOKENS_PER_IMAGE}")
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= CODEBOOK_SIZE:
                raise ValueError(f"token {hi if hi >= CODEBOOK_SIZE else lo} outside 0..{CODEBOOK_SIZE - 1}")
        except (ValueError, UnicodeDecodeError, binascii.Error) as e:
            yield Skip(source=f"{unit.path}:{n}", reason=f"bad LVM token line: {e}", sentence=sid, line=n)
            continue
        yield {"tokens": codes.astype(np.uint16), "n_images": len(codes) // TOKENS_PER_IMAGE, "kind": kind, "id": sid}


# ----------------------------------------------------------------------------------------------
# Output of one unit


def _unit_files(out: Path, name: str) -> list[Path]:
    """Everything under train/ and val/ that belongs to unit `name` (shards, sidecars, temp files)."""
    pat = re.compile(rf"^\.?{re.escape(name)}-\d{{5}}\.")
    return [p for split in SPLITS if (out / split).is_dir() for p in (out / split).iterdir() if pat.match(p.name)]


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


def _unit_record(unit: Unit) -> dict:
    return {"name": unit.name, "kind": unit.kind, "size": unit.size, "start": unit.start, "stop": unit.stop}


def finished_part(out: Path, unit: Unit) -> dict | None:
    """The unit's part report if the unit is finished (same input, every shard present), else None."""
    p = part_path(out, unit.name)
    if not p.is_file():
        return None
    part = json.loads(p.read_text())
    done = part.get("unit") == _unit_record(unit) and all((out / s["path"]).is_file() for s in part["shards"])
    return part if done else None


# ----------------------------------------------------------------------------------------------
# The run


def _fingerprint(cfg: BuildConfig) -> dict:
    keys = ("tokenizer", "val_fraction", "sentences_per_shard", "max_images", "resize", "seed", "fit_images",
            "part_bytes", "import_kind")
    return {k: getattr(cfg, k) for k in keys}


def _check_resume(out: Path, cfg: BuildConfig) -> None:
    fp_file = out / PARTS / "settings.json"
    fp = _fingerprint(cfg)
    if fp_file.is_file():
        old = json.loads(fp_file.read_text())
        if old != fp:
            diff = sorted(k for k in fp if old.get(k) != fp[k])
            raise SystemExit(f"error: {out} holds shards made with other settings ({', '.join(diff)} differ); "
                             "use another --out or pass --overwrite")
    else:
        (out / PARTS).mkdir(parents=True, exist_ok=True)
        atomic_write_text(fp_file, json.dumps(fp, indent=2, sort_keys=True))


def encode_device(cfg: BuildConfig):
    """The device this rank encodes on: --device, else its own GPU, else the CPU."""
    import torch

    from lvm.launch_env import launch_env, local_device

    if cfg.device:
        return torch.device(cfg.device)
    return local_device(launch_env())


def fit_sample(cfg: BuildConfig, units: list[Unit], pool) -> np.ndarray:
    """Frames for fitting the embedded tokenizer: units in a seeded order, up to `quota` train images
    from the start of each, until `fit_images` (deterministic; reads only the units it samples)."""
    order = np.random.default_rng(cfg.seed).permutation(len(units))
    quota = max(32, math.ceil(cfg.fit_images / max(len(units), 1)))
    frames, n = [], 0
    for u in order:
        got = 0
        for item in decoded_stream(units[u], cfg, pool):
            if isinstance(item, Skip) or is_val(item[0].id, cfg.val_fraction):
                continue
            frames.append(item[1])
            got += len(item[1])
            if got >= quota or n + got >= cfg.fit_images:
                break
        n += got
        if n >= cfg.fit_images:
            break
    if not frames:
        raise SystemExit("error: no decodable image to fit the patch-kmeans tokenizer on")
    return np.concatenate(frames)[: cfg.fit_images]


def fitted_tokenizer_dir(cfg: BuildConfig) -> Path | None:
    """OUT/tokenizer when the tokenizer is the embedded one to fit on this corpus, else None."""
    kind, path = parse_spec(cfg.tokenizer)
    return Path(cfg.out) / "tokenizer" if kind == "patch-kmeans" and path is None else None


def fit_tokenizer(cfg: BuildConfig, units: list[Unit], pool) -> PatchKMeansTokenizer:
    tok_dir = fitted_tokenizer_dir(cfg)
    if (tok_dir / "config.json").is_file():
        return PatchKMeansTokenizer.load(tok_dir)
    tok = PatchKMeansTokenizer.fit(fit_sample(cfg, units, pool), seed=cfg.seed)
    tmp = temp_path(tok_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save(tmp)
    try:
        tmp.rename(tok_dir)
    except OSError:  # another process finished first: theirs is identical (same sample, same seed)
        shutil.rmtree(tmp, ignore_errors=True)
    return PatchKMeansTokenizer.load(tok_dir)


def resolve_tokenizer(cfg: BuildConfig, units: list[Unit], pool, device):
    tok_dir = fitted_tokenizer_dir(cfg)
    if tok_dir is None:
        return load_tokenizer(cfg.tokenizer, device)
    if (tok_dir / "config.json").is_file():
        return PatchKMeansTokenizer.load(tok_dir)
    if cfg.world_size > 1 or cfg.index_only:
        raise SystemExit(f"error: no fitted tokenizer in {tok_dir}: run make_shards.py --fit-only with the same "
                         "--input and --out once before the ranks (or pass --tokenizer)")
    return fit_tokenizer(cfg, units, pool)


def tokenizer_info(tok, out: Path, cfg: BuildConfig) -> dict:
    """tokenizer.json of OUT (`lvm.artifacts.TokenizerRecord`: a folder inside OUT relative, so the folder can
    move; the weights' digest)."""
    return TokenizerRecord.of_tokenizer(tok, cfg.resize).to_info(relative_to=out)


def tokenizer_from_shards(shards_root: str | Path, device=None):
    """The tokenizer recorded in tokenizer.json beside shards (relative paths resolved there)."""
    return TokenizerRecord.from_shards(shards_root).load(device)


class Encoder:
    """Frames -> uint16 codes on the rank's device, in batches; a GPU gets them through pinned memory
    as channels_last (the NHWC frames permuted, no copy)."""

    def __init__(self, tok, device, batch_size: int):
        self.tok, self.device, self.batch_size = tok, device, batch_size

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        import torch

        out = []
        for s in range(0, len(frames), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(frames[s : s + self.batch_size]))
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            pixels = x.permute(0, 3, 1, 2).float().div_(255.0)
            out.append(self.tok.encode(pixels).cpu())
        return torch.cat(out).numpy().astype(np.uint16)


def build_unit(unit: Unit, cfg: BuildConfig, encode, pool, bar) -> dict:
    """Process one unit into its shards; returns its part report (also written to .parts/)."""
    out = Path(cfg.out)
    for p in _unit_files(out, unit.name):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for p in (out / PARTS).glob(f".{glob.escape(unit.name)}.json.tmp.*"):
        p.unlink(missing_ok=True)
    output = UnitOutput(out, unit.name, cfg.sentences_per_shard)
    skipped: list[Skip] = []

    def emit(rows):
        for r in rows:
            output.add("val" if is_val(r["id"], cfg.val_fraction) else "train", r)

    if unit.kind == "lvm-jsonl":
        for item in lvm_token_rows(unit, cfg.import_kind):
            if isinstance(item, Skip):
                skipped.append(item)
            else:
                emit([item])
                bar.update(item["n_images"])
    else:
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
                emit(_rows(encode, pending))
                pending, n_pending = [], 0
        emit(_rows(encode, pending))
    output.close()
    part = {"unit": _unit_record(unit), "input": unit.path, "shards": output.shards,
            "skipped": [s.as_dict() for s in skipped]}
    atomic_write_text(part_path(out, unit.name), json.dumps(part, indent=1))  # the mark of a finished unit
    return part


def _rows(encode, decoded: list[tuple[Sentence, np.ndarray]]) -> list[dict]:
    if not decoded:
        return []
    codes = encode(np.concatenate([f for _, f in decoded]))
    rows, at = [], 0
    for s, f in decoded:
        rows.append({"tokens": codes[at : at + len(f)].reshape(-1), "n_images": len(f), "kind": s.kind, "id": s.id})
        at += len(f)
    return rows


def write_index(out: Path, units: list[Unit], tok_info: dict) -> dict | None:
    """index.json + report.json once every unit is finished; None while some are not."""
    parts = []
    for u in units:
        part = finished_part(out, u)
        if part is None:
            return None
        parts.append(part)
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
    atomic_write_text(out / "tokenizer.json", json.dumps(tok_info, indent=2))
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


def _pool(cfg: BuildConfig):
    if cfg.workers == 0:
        return None
    return mp.get_context("forkserver").Pool(cfg.workers)


def build_shards(cfg: BuildConfig, overwrite: bool = False) -> dict:
    """Run make_shards; returns a summary dict. Raises SystemExit with a one-line error on bad input."""
    cfg.check()
    out = Path(cfg.out)
    try:
        units = plan_units(cfg.inputs, cfg.part_bytes, "lvm-jsonl" if cfg.import_kind else None)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    if overwrite and cfg.rank == 0 and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, cfg)
    t0 = time.perf_counter()
    pool = _pool(cfg) if not cfg.index_only and cfg.import_kind is None else None
    stats = {"units": 0, "shards": 0, "images": 0, "sentences": 0}
    threads = None
    try:
        if cfg.import_kind is not None:
            tok, tok_info, encode = None, cfg.tokenizer_info, None
        else:
            device = encode_device(cfg)
            if device.type == "cuda":  # the rank's current device too, for anything that allocates on "cuda"
                import torch

                torch.cuda.set_device(device)
            tok = resolve_tokenizer(cfg, units, pool, device)
            if tok.codebook_size != CODEBOOK_SIZE or tok.image_size != IMAGE_SIZE or tok.tokens_per_image != TOKENS_PER_IMAGE:
                raise SystemExit(f"error: tokenizer {tok.spec} makes {tok.tokens_per_image} codes of {tok.codebook_size} "
                                 f"per {tok.image_size}px image; this pipeline needs {TOKENS_PER_IMAGE} of {CODEBOOK_SIZE} "
                                 f"at {IMAGE_SIZE}px")
            tok_info = tokenizer_info(tok, out, cfg)
            encode = Encoder(tok, device, cfg.batch_size)
            if device.type == "cpu" and pool is not None:
                # the decode workers have their cores: more intra-op threads here only oversubscribe them
                import torch

                threads = torch.get_num_threads()
                torch.set_num_threads(max(1, (os.cpu_count() or 1) - cfg.workers))
        fit_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        if cfg.rank == 0 and not cfg.index_only:
            atomic_write_text(out / "tokenizer.json", json.dumps(tok_info, indent=2))
        if cfg.fit_only:
            return {"out": str(out), "report": None, "this_run": stats, "seconds": 0.0, "tokenizer_seconds": fit_seconds,
                    "images_per_s": 0.0, "units": len(units), "tokenizer": tok_info["spec"], "fit_only": True}
        mine = units[cfg.rank :: cfg.world_size]
        todo = [] if cfg.index_only else [u for u in mine if finished_part(out, u) is None]
        with tqdm(unit="img", desc=f"shards[{cfg.rank}/{cfg.world_size}]", file=sys.stderr, dynamic_ncols=True,
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
        if threads:
            import torch

            torch.set_num_threads(threads)
    elapsed = time.perf_counter() - t0
    report = write_index(out, units, tok_info) if cfg.rank == 0 or cfg.index_only else None
    return {"out": str(out), "report": report, "this_run": stats, "seconds": elapsed, "tokenizer_seconds": fit_seconds,
            "images_per_s": stats["images"] / elapsed if elapsed > 0 else 0.0, "units": len(units),
            "tokenizer": tok_info["spec"]}


def summary_line(s: dict) -> str:
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


__all__ = ["BuildConfig", "build_shards", "summary_line", "tokenizer_from_shards", "is_val", "remove_temp_files"]
