"""A second video corpus for checking that a recipe is not tuned to the demo's shapes: camera pans over real
photographs (the images that ship with scikit-image), written as H.264 clips with a manifest.

Each clip picks a photograph, scales it so that the pan fits, and moves a 256x256 view by one token patch
(16 pixels) per frame in one of eight directions. Consecutive frames therefore share all but one row or column of
patches, shifted by one patch: a model must find where each patch went, not copy the same position.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lvm.data.manifest import write_manifest
from lvm.data.synth import SIZE, write_video

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "colorwheel", "camera", "moon", "grass", "gravel", "brick", "coins")
STEP = 16  # pixels per frame: one patch of the 16x16 token grid
DIRECTIONS = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]


def photographs() -> list[Image.Image]:
    try:
        import skimage.data
    except ImportError as e:
        raise RuntimeError("the pan corpus needs scikit-image (pip install scikit-image): its photographs are the source") from e
    out = []
    for name in PHOTOS:
        a = np.asarray(getattr(skimage.data, name)())
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        out.append(Image.fromarray(a[..., :3].astype(np.uint8), "RGB"))
    return out


def pan_frames(photo: Image.Image, rng: np.random.Generator, frames: int) -> list[Image.Image]:
    dx, dy = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    need = SIZE + STEP * (frames - 1)  # the view's travel along each moving axis
    scale = max(need / photo.width, need / photo.height) * float(rng.uniform(1.0, 1.6))
    img = photo.resize((int(np.ceil(photo.width * scale)), int(np.ceil(photo.height * scale))), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    span_x, span_y = img.width - SIZE - STEP * (frames - 1) * abs(dx), img.height - SIZE - STEP * (frames - 1) * abs(dy)
    x0 = int(rng.integers(0, span_x + 1)) + (STEP * (frames - 1) if dx < 0 else 0)
    y0 = int(rng.integers(0, span_y + 1)) + (STEP * (frames - 1) if dy < 0 else 0)
    return [img.crop((x0 + dx * STEP * t, y0 + dy * STEP * t, x0 + dx * STEP * t + SIZE, y0 + dy * STEP * t + SIZE))
            for t in range(frames)]


def make_pan_corpus(out: str | Path, seed: int = 0, clips: int = 200, frames: int = 16) -> Path:
    """Write `clips` pan videos of `frames` frames and their manifest into `out`; same seed, same corpus."""
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = photographs()
    lines = []
    for i in range(clips):
        name = f"videos/pan_{i:04d}.mp4"
        write_video(pan_frames(photos[int(rng.integers(len(photos)))], rng, frames), out / name)
        lines.append({"video": name, "kind": "video", "max_frames": frames, "id": f"pan/{i:04d}"})
    manifest = out / "manifest.jsonl"
    write_manifest(lines, manifest)
    (out / "corpus.json").write_text(json.dumps({"kind": "pans", "seed": seed, "clips": clips, "frames": frames}, indent=2))
    return manifest
