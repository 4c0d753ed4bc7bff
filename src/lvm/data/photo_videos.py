"""Video corpora made from real photographs (the images that ship with scikit-image), for checking that a recipe
is not tuned to the demo's synthetic shapes; H.264 clips with a manifest.

- pans: each clip picks a photograph, scales it so that the pan fits, and moves a 256x256 view by one token patch
  (16 pixels) per frame in one of eight directions. Consecutive frames share all but one row or column of patches,
  shifted by one patch: a model must find where each patch went (which way the camera moves), not copy the same
  position.
- scenes: a fixed camera on one photograph, with two to four pieces cut from other photographs moving and turning
  over it (as the demo's shapes do over their textures).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lvm.data.offline.sources.manifest import write_manifest
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


def view(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random 256x256 view of a photograph (scaled so that its short side is 256 to 512 pixels)."""
    scale = float(rng.uniform(SIZE, 2 * SIZE)) / min(photo.size)
    img = photo.resize((max(SIZE, round(photo.width * scale)), max(SIZE, round(photo.height * scale))), Image.BICUBIC)
    x, y = int(rng.integers(0, img.width - SIZE + 1)), int(rng.integers(0, img.height - SIZE + 1))
    return img.crop((x, y, x + SIZE, y + SIZE))


def scene_frames(photos: list[Image.Image], rng: np.random.Generator, frames: int) -> list[Image.Image]:
    bg = view(photos[int(rng.integers(len(photos)))], rng)
    pieces = []
    for _ in range(int(rng.integers(2, 5))):
        r = int(rng.integers(24, 56))
        src = view(photos[int(rng.integers(len(photos)))], rng).resize((2 * r, 2 * r), Image.BICUBIC)
        mask = Image.new("L", (2 * r, 2 * r), 0)
        n = int(rng.integers(3, 9))
        a0 = float(rng.uniform(0, 2 * np.pi))
        ImageDraw.Draw(mask).polygon([(r + r * np.cos(a0 + 2 * np.pi * k / n), r + r * np.sin(a0 + 2 * np.pi * k / n))
                                      for k in range(n)], fill=255)
        pieces.append((src, mask, rng.uniform(r, SIZE - r, 2), rng.uniform(-8, 8, 2), float(rng.uniform(-12, 12))))
    out = []
    for t in range(frames):
        img = bg.copy()
        for src, mask, p0, v, spin in pieces:
            piece, m = src.rotate(spin * t, Image.BICUBIC), mask.rotate(spin * t, Image.NEAREST)
            cx, cy = (p0 + v * t) % SIZE
            img.paste(piece, (int(cx) - src.width // 2, int(cy) - src.height // 2), m)
        out.append(img)
    return out


KINDS = {"pans": "pan", "scenes": "scene"}


def make_photo_video_corpus(out: str | Path, kind: str = "pans", seed: int = 0, clips: int = 200, frames: int = 16) -> Path:
    """Write `clips` videos of `frames` frames (`kind`: pans or scenes) and their manifest into `out`; same seed,
    same corpus."""
    if kind not in KINDS:
        raise ValueError(f"photo video corpus kind must be one of {', '.join(KINDS)}, not {kind!r}")
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = photographs()
    lines = []
    for i in range(clips):
        name = f"videos/{KINDS[kind]}_{i:04d}.mp4"
        clip = (pan_frames(photos[int(rng.integers(len(photos)))], rng, frames) if kind == "pans"
                else scene_frames(photos, rng, frames))
        write_video(clip, out / name)
        lines.append({"video": name, "kind": "video", "max_frames": frames, "id": f"{KINDS[kind]}/{i:04d}"})
    manifest = out / "manifest.jsonl"
    write_manifest(lines, manifest)
    (out / "corpus.json").write_text(json.dumps({"kind": kind, "seed": seed, "clips": clips, "frames": frames}, indent=2))
    return manifest
