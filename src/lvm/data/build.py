"""make_shards: manifest -> decoded frames -> visual codes -> Arrow shards, resumable and exact.

Plan. Sentences are split into train/val by a hash of their id (chunks of one sentence stay
together), kept in manifest order, and cut into shards of `sentences_per_shard`. The plan depends
only on the manifest and the arguments, never on `--workers` or the number of ranks, so the
output is byte-identical however the work is spread.

Work. Rank r of W (see `lvm.launch_env`) builds shards r, r+W, ...; frames are decoded by a pool
of `workers` processes (order preserved) and tokenized in batches of `batch_size` frames. A shard
is written to a temporary name and renamed; a small part-report beside it records what it skipped.
A rerun skips every shard whose file and part-report exist, so a killed run resumes.

Index. When every shard exists, `index.json` (the shards and their counts) and `report.json`
(totals and every skipped source with its reason) are written; with several ranks, run the index
step once more at the end (`--index-only`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lvm.data.decode import try_decode
from lvm.data.manifest import DEFAULT_MAX_IMAGES, Sentence, Skip, read_manifest
from lvm.data.shards import SPLITS, atomic_write_text, write_shard
from lvm.model.vocab import CODEBOOK_SIZE, IMAGE_SIZE, TOKENS_PER_IMAGE
from lvm.tokenizer import load_tokenizer, parse_spec
from lvm.tokenizer.patch_kmeans import PatchKMeansTokenizer
from lvm.tokenizer.preprocess import RESIZE_MODES, to_pixels

PARTS = ".parts"


@dataclass
class BuildConfig:
    manifest: str
    out: str
    tokenizer: str = "patch-kmeans"
    workers: int = 2
    batch_size: int = 64
    val_fraction: float = 0.05
    sentences_per_shard: int = 512
    max_images: int = DEFAULT_MAX_IMAGES
    resize: str = "squash"
    seed: int = 0
    fit_images: int = 2048
    rank: int = 0
    world_size: int = 1
    index_only: bool = False
    device: str | None = None
    progress: bool = True

    def check(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 0 or self.batch_size < 1 or self.sentences_per_shard < 1:
            raise ValueError("--workers must be >= 0, --batch-size and --sentences-per-shard >= 1")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"--resize must be one of {RESIZE_MODES}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        parse_spec(self.tokenizer)


def is_val(sentence_id: str, fraction: float) -> bool:
    base = sentence_id.split("#")[0].encode()
    return int(hashlib.sha1(base).hexdigest()[:12], 16) / 16**12 < fraction


def plan_shards(sentences: list[Sentence], cfg: BuildConfig) -> list[tuple[str, list[Sentence]]]:
    """[(relative shard path, its sentences)] for train then val."""
    by_split = {s: [] for s in SPLITS}
    for s in sentences:
        by_split["val" if is_val(s.id, cfg.val_fraction) else "train"].append(s)
    plan = []
    for split in SPLITS:
        group = by_split[split]
        for k in range(0, len(group), cfg.sentences_per_shard):
            plan.append((f"{split}/{split}-{k // cfg.sentences_per_shard:05d}.arrow", group[k : k + cfg.sentences_per_shard]))
    return plan


def _fingerprint(cfg: BuildConfig) -> dict:
    keys = ("tokenizer", "val_fraction", "sentences_per_shard", "max_images", "resize", "seed", "fit_images")
    digest = hashlib.sha256(Path(cfg.manifest).read_bytes()).hexdigest()
    return {"manifest_sha256": digest, **{k: getattr(cfg, k) for k in keys}}


def _check_resume(out: Path, cfg: BuildConfig) -> None:
    fp_file = out / PARTS / "plan.json"
    fp = _fingerprint(cfg)
    if fp_file.is_file():
        old = json.loads(fp_file.read_text())
        if old != fp:
            diff = sorted(k for k in fp if old.get(k) != fp[k])
            raise SystemExit(f"error: {out} holds shards made with other inputs ({', '.join(diff)} differ); "
                             "use another --out or pass --overwrite")
    else:
        (out / PARTS).mkdir(parents=True, exist_ok=True)
        atomic_write_text(fp_file, json.dumps(fp, indent=2, sort_keys=True))


def _decoded(pool, sentences, resize):
    args = ((s, resize) for s in sentences)
    return pool.imap(try_decode, args, chunksize=1) if pool else map(try_decode, args)


def resolve_tokenizer(cfg: BuildConfig, train: list[Sentence], pool):
    """Load the tokenizer, or fit the embedded one on the corpus (once; saved in OUT/tokenizer)."""
    kind, path = parse_spec(cfg.tokenizer)
    out = Path(cfg.out)
    if kind != "patch-kmeans" or path is not None:
        return load_tokenizer(cfg.tokenizer, cfg.device)
    tok_dir = out / "tokenizer"
    if (tok_dir / "config.json").is_file():
        return PatchKMeansTokenizer.load(tok_dir)
    order = np.random.default_rng(cfg.seed).permutation(len(train))
    frames, n = [], 0
    for res in _decoded(pool, [train[i] for i in order], cfg.resize):
        if isinstance(res, tuple):
            continue
        frames.append(res)
        n += len(res)
        if n >= cfg.fit_images:
            break
    if not frames:
        raise SystemExit("error: no decodable image to fit the patch-kmeans tokenizer on")
    tok = PatchKMeansTokenizer.fit(np.concatenate(frames)[: cfg.fit_images], seed=cfg.seed)
    tok.save(tok_dir)
    return tok


def tokenizer_info(tok, out: Path, cfg: BuildConfig) -> dict:
    spec = tok.spec
    kind, path = parse_spec(spec)
    if path and Path(path).resolve().is_relative_to(out.resolve()):
        spec = f"{kind}:{Path(path).resolve().relative_to(out.resolve())}"  # relative: the folder can move
    return {"spec": spec, "kind": tok.kind, "codebook_size": tok.codebook_size, "image_size": tok.image_size,
            "tokens_per_image": tok.tokens_per_image, "resize": cfg.resize, "details": tok.describe()}


def tokenizer_from_shards(shards_root: str | Path, device=None):
    """The tokenizer recorded in tokenizer.json beside shards (relative paths resolved there)."""
    from lvm.data.shards import read_tokenizer_info

    root = Path(shards_root)
    info = read_tokenizer_info(root)
    kind, path = parse_spec(info["spec"])
    base = root if (root / "tokenizer.json").is_file() else root.parent
    if path and not Path(path).is_absolute():
        path = str(base / path)
    return load_tokenizer(f"{kind}:{path}", device)


def _tokenize_rows(tok, decoded: list[tuple[Sentence, np.ndarray]], batch_size: int) -> list[dict]:
    import torch

    if not decoded:
        return []
    frames = np.concatenate([f for _, f in decoded])
    codes = torch.cat([tok.encode(to_pixels(frames[s : s + batch_size])) for s in range(0, len(frames), batch_size)])
    codes = codes.numpy().astype(np.uint16)
    rows, at = [], 0
    for s, f in decoded:
        rows.append({"tokens": codes[at : at + len(f)].reshape(-1), "n_images": len(f), "kind": s.kind, "id": s.id})
        at += len(f)
    return rows


def build_shard(tok, pool, sentences: list[Sentence], cfg: BuildConfig, bar) -> tuple[list[dict], list[Skip]]:
    rows, skipped, pending, n_pending = [], [], [], 0
    for s, res in zip(sentences, _decoded(pool, sentences, cfg.resize), strict=True):
        if isinstance(res, tuple):
            skipped.append(Skip(source=res[0], reason=res[1], sentence=s.id, line=s.line))
            bar.update(len(s.images) or 1)
            continue
        pending.append((s, res))
        n_pending += len(res)
        bar.update(len(res))
        if n_pending >= cfg.batch_size:
            rows += _tokenize_rows(tok, pending, cfg.batch_size)
            pending, n_pending = [], 0
    rows += _tokenize_rows(tok, pending, cfg.batch_size)
    return rows, skipped


def write_index(out: Path, plan, manifest_skips: list[Skip], tok_info: dict) -> dict | None:
    """index.json + report.json once every planned shard exists; None if some are missing."""
    parts, missing = [], []
    for rel, _ in plan:
        part = out / PARTS / (Path(rel).stem + ".json")
        if not ((out / rel).is_file() and part.is_file()):
            missing.append(rel)
        else:
            parts.append((rel, json.loads(part.read_text())))
    if missing:
        return None
    totals = {split: {"sentences": 0, "images": 0, "tokens": 0, "shards": 0, "bytes": 0} for split in SPLITS}
    skipped = [s.as_dict() for s in manifest_skips]
    for rel, p in parts:
        t = totals[rel.split("/")[0]]
        t["sentences"] += p["sentences"]
        t["images"] += p["images"]
        t["tokens"] += p["images"] * TOKENS_PER_IMAGE
        t["shards"] += 1
        t["bytes"] += p["bytes"]
        skipped += p["skipped"]
    all_images = sum(t["images"] for t in totals.values())
    index = {"format": "lvm-shards/1", "tokenizer": tok_info,
             "shards": [{"path": rel, **{k: p[k] for k in ("sentences", "images", "bytes")}} for rel, p in parts],
             "totals": totals}
    report = {"written": totals,
              "bytes_per_image": round(sum(t["bytes"] for t in totals.values()) / max(all_images, 1), 1),
              "skipped_count": len(skipped),
              "skipped_by_reason": _count_reasons(skipped),
              "skipped": skipped}
    atomic_write_text(out / "index.json", json.dumps(index, indent=2))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    return report


def _count_reasons(skipped: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for s in skipped:
        key = s["reason"].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def build_shards(cfg: BuildConfig, overwrite: bool = False) -> dict:
    """Run make_shards; returns a summary dict. Raises SystemExit with a one-line error on bad input."""
    cfg.check()
    out = Path(cfg.out)
    if overwrite and cfg.rank == 0 and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(cfg.manifest, cfg.max_images)
    _check_resume(out, cfg)
    plan = plan_shards(manifest.sentences, cfg)
    train = [s for rel, group in plan if rel.startswith("train/") for s in group]
    t0 = time.perf_counter()
    ctx = mp.get_context("forkserver")
    pool = ctx.Pool(cfg.workers) if cfg.workers > 0 and not cfg.index_only else None
    try:
        tok = resolve_tokenizer(cfg, train, pool)
        fit_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        if tok.codebook_size != CODEBOOK_SIZE or tok.image_size != IMAGE_SIZE or tok.tokens_per_image != TOKENS_PER_IMAGE:
            raise SystemExit(f"error: tokenizer {tok.spec} makes {tok.tokens_per_image} codes of {tok.codebook_size} "
                             f"per {tok.image_size}px image; this pipeline needs {TOKENS_PER_IMAGE} of {CODEBOOK_SIZE} at {IMAGE_SIZE}px")
        tok_info = tokenizer_info(tok, out, cfg)
        atomic_write_text(out / "tokenizer.json", json.dumps(tok_info, indent=2))
        mine = [(rel, group) for k, (rel, group) in enumerate(plan) if k % cfg.world_size == cfg.rank]
        todo = [(rel, g) for rel, g in mine
                if not ((out / rel).is_file() and (out / PARTS / (Path(rel).stem + ".json")).is_file())]
        n_images = sum(len(s.images) or s.max_frames for _, g in todo for s in g)
        stats = {"shards": 0, "images": 0, "sentences": 0}
        with tqdm(total=n_images, unit="img", desc=f"shards[{cfg.rank}/{cfg.world_size}]",
                  disable=not cfg.progress or cfg.index_only, file=sys.stderr, dynamic_ncols=True) as bar:
            for rel, group in ([] if cfg.index_only else todo):
                rows, skipped = build_shard(tok, pool, group, cfg, bar)
                nbytes = write_shard(out / rel, rows)
                part = {"sentences": len(rows), "images": int(sum(r["n_images"] for r in rows)), "bytes": nbytes,
                        "skipped": [s.as_dict() for s in skipped]}
                # written after the shard: a part-report is the mark of a finished shard
                atomic_write_text(out / PARTS / (Path(rel).stem + ".json"), json.dumps(part, indent=1))
                stats["shards"] += 1
                stats["images"] += part["images"]
                stats["sentences"] += part["sentences"]
    finally:
        if pool:
            pool.close()
            pool.join()
    elapsed = time.perf_counter() - t0
    report = write_index(out, plan, manifest.skipped, tok_info) if cfg.rank == 0 or cfg.index_only else None
    return {"out": str(out), "report": report, "this_run": stats, "seconds": elapsed, "tokenizer_seconds": fit_seconds,
            "images_per_s": stats["images"] / elapsed if elapsed > 0 else 0.0,
            "planned_shards": len(plan), "tokenizer": tok_info["spec"]}


def summary_line(s: dict) -> str:
    r = s["report"]
    if r is None:
        return (f"rank done: {s['this_run']['shards']} shards ({s['this_run']['images']} images, "
                f"{s['images_per_s']:.0f} img/s); run the index step (--index-only) once all ranks finish")
    w = r["written"]
    sent = sum(t["sentences"] for t in w.values())
    imgs = sum(t["images"] for t in w.values())
    shards = sum(t["shards"] for t in w.values())
    return (f"wrote {sent} sentences ({imgs} images, {imgs * TOKENS_PER_IMAGE} tokens; train {w['train']['sentences']}, "
            f"val {w['val']['sentences']}) in {shards} shards to {s['out']}, {r['bytes_per_image']} B/image; "
            f"skipped {r['skipped_count']} (see report.json); this run {s['this_run']['images']} images in "
            f"{s['seconds']:.1f}s = {s['images_per_s']:.0f} img/s (+ {s['tokenizer_seconds']:.1f}s loading/fitting the tokenizer)")


__all__ = ["BuildConfig", "build_shards", "summary_line", "tokenizer_from_shards", "plan_shards", "is_val"]
