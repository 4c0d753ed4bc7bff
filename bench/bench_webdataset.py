#!/usr/bin/env python
"""Offline stage at corpus scale: a bench-written webdataset (img2dataset layout, JPEGs of 256-640 px).

Rows: decode alone (the decode workers, no encoding), encode alone (the rank's tokenizer on decoded
frames), make_shards end to end and its share of the slower stage; peak RSS of one rank (its main
process) for 1 tar vs 50 tars of the same size; VQGAN bf16 encode on
the GPU where one is present.

    python bench/bench_webdataset.py [--images 5000] [--tars 50] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def photo_like(rng: np.random.Generator) -> bytes:
    """A JPEG with photo-like statistics (smooth shapes, texture, noise) of a LAION-like size."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = (int(v) for v in rng.integers(256, 641, 2))
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w)), y0 + int(rng.integers(20, h))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 8, (h, w, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_webdataset(folder: Path, n_tars: int, per_tar: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = [photo_like(rng) for _ in range(min(per_tar * n_tars, 400))]  # distinct JPEGs, reused across tars
    paths = []
    for t in range(n_tars):
        path = folder / f"{t:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_tar):
                key = f"{t:05d}{i:04d}"
                for ext, data in (("jpg", pool[(t * per_tar + i) % len(pool)]),
                                  ("json", json.dumps({"key": key, "status": "success"}).encode()), ("txt", b"caption")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


RUN = r"""
import json, resource, sys, time
from lvm.data.offline.config import BuildConfig
from lvm.data.offline.pipeline import build_shards
cfg = BuildConfig(**json.loads(sys.argv[1]))
t = time.perf_counter()
s = build_shards(cfg)
print(json.dumps({"seconds": time.perf_counter() - t, "images": s["this_run"]["images"],
                  "images_per_s": s["images_per_s"],
                  "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_build(**cfg) -> dict:
    r = subprocess.run([sys.executable, "-c", RUN, json.dumps(cfg)], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"error: make_shards failed in the bench:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def decode_alone(tars: list[Path], workers: int) -> float:
    """images/s of the decode stage alone: the build's own decoded stream of each tar, nothing encoded."""
    from lvm.data.offline.config import BuildConfig
    from lvm.data.offline.decode import decode_pool, decoded_stream
    from lvm.data.offline.units import plan_units

    cfg = BuildConfig(workers=workers)
    pool = decode_pool(workers)
    try:
        t, n = time.perf_counter(), 0
        for unit in plan_units([str(tar) for tar in tars]):
            n += sum(1 for x in decoded_stream(unit, cfg, pool) if isinstance(x, tuple))
        return n / (time.perf_counter() - t)
    finally:
        if pool:
            pool.close()
            pool.join()


def encode_alone(tok, frames: np.ndarray, batch: int) -> float:
    import torch

    from lvm.data.offline.encode import Encoder

    enc = Encoder(tok, torch.device("cpu"), batch)
    enc(frames[:batch])
    t = time.perf_counter()
    enc(frames)
    return len(frames) / (time.perf_counter() - t)


def gpu_vqgan_row() -> list:
    import torch

    if not torch.cuda.is_available():
        return ["VQGAN bf16 encode (GPU)", "n/a", "no GPU here; goal >= 1,800 img/s on one H100"]
    from lvm.tokenizer.vqgan import VQGAN, VQGANConfig, VQGANTokenizer

    torch.manual_seed(0)
    vq = VQGANTokenizer(VQGAN(VQGANConfig()), "vqgan:random", device="cuda")
    x = torch.rand(64, 3, 256, 256).pin_memory()
    for _ in range(3):
        vq.encode(x)
    torch.cuda.synchronize()
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 10:
        vq.encode(x)
        n += len(x)
    torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t)
    return [f"VQGAN bf16 encode (batch 64, {torch.cuda.get_device_name()})", f"{rate:,.0f} img/s", "goal >= 1,800 img/s on one H100"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--tars", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    from lvm.data.offline.sources.webdataset import iter_samples
    from lvm.tokenizer.patch_kmeans import PatchKMeansTokenizer
    from lvm.tokenizer.preprocess import load_image

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_tar = a.images // a.tars
        tars = write_webdataset(tmp / "wds", a.tars, per_tar)
        mb = sum(t.stat().st_size for t in tars) / 2**20
        frames = np.stack([load_image(s.image()[1]) for s in iter_samples(str(tars[0]))][:per_tar])
        tok = PatchKMeansTokenizer.fit(frames, iters=3)
        tok.save(tmp / "tok")
        spec = f"patch-kmeans:{tmp / 'tok'}"
        dec = decode_alone(tars[: max(1, a.tars // 5)], a.workers)
        rows.append([f"decode alone ({a.workers} workers, JPEG 256-640 px)", f"{dec:,.0f} img/s", ""])
        enc = encode_alone(tok, np.concatenate([frames] * max(1, 1024 // len(frames)))[:1024], 64)
        rows.append(["encode alone (patch-kmeans, CPU, batch 64)", f"{enc:,.0f} img/s", ""])
        base = dict(tokenizer=spec, workers=a.workers, progress=False, sentences_per_shard=8192)
        full = run_build(inputs=[str(t) for t in tars], out=str(tmp / "out50"), **base)
        rows.append([f"make_shards end to end ({a.tars} tars, {a.images} images, {mb:.0f} MB)",
                     f"{full['images_per_s']:,.0f} img/s", f"{full['seconds']:.1f}s in all"])
        rows.append(["end to end / slower stage", f"{full['images_per_s'] / min(dec, enc):.0%}", "goal >= 90%"])
        one = run_build(inputs=[str(tars[0])], out=str(tmp / "out1"), **base)
        rows.append(["peak RSS of the rank (main process): 1 tar", f"{one['rss_main_mb']:,.0f} MB",
                     "includes the patch-kmeans distance matrix of a 64-image batch (512 MB)"])
        rows.append([f"peak RSS of the rank (main process): {a.tars} tars", f"{full['rss_main_mb']:,.0f} MB",
                     f"goal: within 50 MB of 1 tar (measured {full['rss_main_mb'] - one['rss_main_mb']:+,.0f} MB)"])
        rows.append(gpu_vqgan_row())
    print_table("Offline stage on a webdataset (make_shards --input 'wds/*.tar')", ["measure", "value", "note"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
