"""A small folder of labelled images in the layouts of lvm.data.labelled (for the store and compose tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import scene

N_IMAGES = 8
N_DEPTH = 4
N_NORMALS = 3
CATEGORIES = {"cat": 4, "dog": 5}


def make_labelled_tree(root: Path) -> Path:
    """images/ + annotations/ (class ids), depth/ (16-bit PNG), normals/ (.npy), categories/<name>/, one broken
    annotation and one image without labels."""
    for sub in ("images/training", "annotations/training", "depth/training", "normals/training"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        scene(100 + i, (300, 200)).save(root / "images/training" / f"img{i:02d}.jpg", quality=92)
        classes = np.zeros((200, 300), np.uint8)
        for c in range(1, 6):
            y, x = rng.integers(0, 150), rng.integers(0, 250)
            classes[y : y + 50, x : x + 50] = c + i
        Image.fromarray(classes, "L").save(root / "annotations/training" / f"img{i:02d}.png")
        if i < N_DEPTH:
            yy, xx = np.mgrid[0:200, 0:300]
            depth = (500 + 10 * xx + 5 * yy + 100 * i).astype(np.uint16)
            depth[:20, :20] = 0  # no measurement
            Image.fromarray(depth).save(root / "depth/training" / f"img{i:02d}.png")
        if i < N_NORMALS:
            n = rng.normal(size=(200, 300, 3))
            np.save(root / "normals/training" / f"img{i:02d}.npy", n / np.linalg.norm(n, axis=-1, keepdims=True))
    # a truncated annotation: its pair is skipped and reported
    data = (root / "annotations/training/img07.png").read_bytes()
    (root / "annotations/training/img07.png").write_bytes(data[: len(data) // 3])
    scene(999, (64, 64)).save(root / "images/training/unlabelled.png")
    for name, n in CATEGORIES.items():
        (root / "categories" / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            scene(hash((name, k)) % 10_000, (128, 96)).save(root / "categories" / name / f"{k}.png")
    return root
