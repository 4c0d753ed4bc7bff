#!/usr/bin/env python
"""Offline stage throughput: decode+preprocess, tokenizer encode, make_shards end to end, bytes per
image on disk, and the embedded tokenizer's reconstruction PSNR on scikit-image's photos."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, timed  # noqa: E402

from lvm.data.offline.config import BuildConfig  # noqa: E402
from lvm.data.offline.pipeline import build_shards  # noqa: E402
from lvm.data.synth import CorpusSize, make_corpus  # noqa: E402
from lvm.tokenizer.patch_kmeans import PatchKMeansTokenizer, features_to_pixels, patch_features  # noqa: E402
from lvm.tokenizer.preprocess import load_image, prepare_image, to_pixels  # noqa: E402
from lvm.tokenizer.vqgan import VQGAN, VQGANConfig, VQGANTokenizer  # noqa: E402


def psnr(a, b):
    """PSNR of the pooled MSE over all images."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return 10 * np.log10(255**2 / mse)


def mean_psnr(a, b):
    """Mean of per-image PSNRs (the usual figure for tokenizers)."""
    return float(np.mean([psnr(x[None], y[None]) for x, y in zip(a, b, strict=True)]))


def as_uint8(pixels: torch.Tensor) -> np.ndarray:
    return (pixels.movedim(1, -1).numpy() * 255).round().astype(np.uint8)


def photos():
    import skimage.data as d
    from PIL import Image

    names = ["astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "clock",
             "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel", "colorwheel", "cat"]
    return np.stack([prepare_image(Image.fromarray(getattr(d, n)())) for n in names])


def crops(images: np.ndarray, per_image: int, seed: int = 0) -> np.ndarray:
    """Random square crops resized back to 256: more natural patches from few photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for a in images:
        for _ in range(per_image):
            s = int(rng.integers(96, 256))
            y, x = (int(v) for v in rng.integers(0, 256 - s + 1, 2))
            out.append(np.asarray(Image.fromarray(a[y : y + s, x : x + s]).resize((256, 256), Image.BICUBIC)))
    return np.stack(out)


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_corpus(tmp / "corpus", seed=0, size=CorpusSize(videos=24, gifs=4, sequences=6, pairs_per_task=32, images=64))
        pngs = sorted((tmp / "corpus" / "images").glob("*.png"))
        t = timed(lambda: [load_image(p) for p in pngs], repeat=3)
        dec_rate = len(pngs) / t
        rows.append(["decode + preprocess (PNG, 1 process)", f"{dec_rate:,.0f} img/s", ""])
        frames = np.stack([load_image(p) for p in pngs])
        tok = PatchKMeansTokenizer.fit(frames, iters=3)
        batch = to_pixels(np.concatenate([frames] * 1)[:64])
        t = timed(lambda: tok.encode(batch), repeat=5)
        enc_rate = len(batch) / t
        rows.append(["patch-kmeans encode (batch 64, CPU)", f"{enc_rate:,.0f} img/s", ""])
        torch.manual_seed(0)
        vq = VQGANTokenizer(VQGAN(VQGANConfig()), "vqgan:random", device="cuda" if torch.cuda.is_available() else "cpu")
        vb = 32 if torch.cuda.is_available() else 4
        x = torch.rand(vb, 3, 256, 256)
        t = timed(lambda: vq.encode(x), repeat=2 if vb == 4 else 10, warmup=1)
        rows.append([f"VQGAN encode (batch {vb}, {vq.device.type}, {str(vq.dtype).split('.')[-1]})", f"{vb / t:,.1f} img/s",
                     "146.2M params; ~216 GFLOP/img"])
        for workers in (0, 2):
            out = tmp / f"shards{workers}"
            s = build_shards(BuildConfig(inputs=[str(manifest)], out=str(out), tokenizer="patch-kmeans", workers=workers,
                                         fit_images=2048, progress=False))
            shard_rate = s["images_per_s"]
            rows.append([f"make_shards end to end (--workers {workers})", f"{shard_rate:,.0f} img/s",
                         f"{s['this_run']['images']} images; + {s['tokenizer_seconds']:.1f}s fitting the tokenizer"])
        report = json.loads((tmp / "shards2" / "report.json").read_text())
        rows.append(["bytes per image on disk", f"{report['bytes_per_image']:.1f} B", "goal <= 520; LVM jsonl 1,365"])
        rows.append(["end-to-end / slower stage", f"{shard_rate / min(dec_rate * 2, enc_rate):.0%}", "goal >= 90% (2 decode workers)"])
        p = photos()
        held = PatchKMeansTokenizer.fit(np.concatenate([p[1::2], crops(p[1::2], 8)]), iters=10)
        rec = as_uint8(held.decode(held.encode(to_pixels(p[::2]))))
        rows.append(["patch-kmeans PSNR, 9 held-out photos", f"{mean_psnr(p[::2], rec):.2f} dB",
                     f"mean per image (pooled MSE: {psnr(p[::2], rec):.2f} dB); fit on the other 9 + 8 crops each; goal >= 20"])
        full = PatchKMeansTokenizer.fit(p, iters=10)
        rec = as_uint8(full.decode(full.encode(to_pixels(p))))
        rows.append(["patch-kmeans PSNR, photos in the fit", f"{mean_psnr(p, rec):.2f} dB",
                     f"mean per image (pooled: {psnr(p, rec):.2f} dB); 18 scikit-image photos"])
        ceiling = as_uint8(features_to_pixels(patch_features(to_pixels(p[::2]), 4), 4))
        rows.append(["4x4 cell means, unquantized (ceiling)", f"{mean_psnr(p[::2], ceiling):.2f} dB",
                     f"the representation's own loss (pooled: {psnr(p[::2], ceiling):.2f} dB)"])
    print_table("Offline stage (make shards)", ["measure", "value", "note"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
