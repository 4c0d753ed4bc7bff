"""Step 2: VQGAN encode rate and `make shards` end to end on the learning corpus."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

try:
    import numpy as np
except ImportError:  # reported by no_gpu_reason with the rest of what is missing
    np = None

from gpu_checks.data import video_corpus
from gpu_checks.procs import run
from gpu_checks.report import Report, Sizes


def step_encode_and_shards(rep: Report, out: Path, sz: Sizes, cuda: bool) -> tuple[Path, Path] | None:
    """VQGAN encode rate; the learning corpus and `make shards` on it. (shards, manifest) or None."""
    if cuda:
        try:
            from bench_webdataset import gpu_vqgan_row

            measure, value, note = gpu_vqgan_row()
            rep.row("2 offline", measure, value, note)
        except Exception as e:  # noqa: BLE001 - the table says what broke, the other steps go on
            rep.fail("2 offline", "VQGAN bf16 encode", f"{type(e).__name__}: {e}")
    corpus = out / "video_corpus"
    shards = out / "video_shards"
    import shutil

    shutil.rmtree(shards, ignore_errors=True)
    t = time.perf_counter()
    manifest = video_corpus(corpus, sz.corpus_videos, max(2, min(16, os.cpu_count() or 2)), frames=sz.corpus_frames)
    rep.row("2 offline", f"synthetic video corpus ({sz.corpus_videos} videos x {sz.corpus_frames} frames)", f"{time.perf_counter() - t:.1f} s",
            "lvm.data.synth shapes, libx264")
    cmd = ["make", "-o", "venv", "-o", ".venv/.installed", "shards", f"PY={sys.executable}", f"INPUT={manifest}",
           f"SHARDS={shards}", f"WORKERS={sz.workers}"]
    rc, dt, p = run(cmd, out / "logs" / "make_shards.log", timeout=600)
    if rc != 0 or not (shards / "report.json").is_file():
        rep.fail("2 offline", "make shards", p.tail())
        return None
    report = json.loads((shards / "report.json").read_text())
    w = report["written"]
    images = w["train"]["images"] + w["val"]["images"]
    device = "cuda" if cuda else "cpu"
    rep.row("2 offline", f"make shards end to end (fit patch-kmeans, encode on {device})", f"{images / dt:,.0f} img/s",
            f"{images} images in {dt:.1f} s; {w['val']['sentences']} held-out videos; {sz.workers} decode workers")
    rep.data["shards"] = {"images": images, "seconds": dt, "val_sentences": w["val"]["sentences"]}
    return shards, manifest
