"""A store manifest (`lvm.data.store`) from a folder of labelled images, in the layouts datasets come in.

    ROOT/images/**              the images (any sub-folders: ADE20K's training/, validation/ ...)
    ROOT/annotations/**.png     segmentation class ids, one 8-bit PNG per image (ADE20K SceneParsing)
                                -> task "segmentation", coloured by the palette of dataset ROOT's name
    ROOT/depth/**.png|.npy      depth maps, 16-bit PNG or NumPy (NYU-style) -> task "depth", colour-mapped
    ROOT/normals/**.npy         surface normals [H, W, 3] in [-1, 1] -> task "normals"
    ROOT/normals/**.png         normals already drawn as colour images -> task "normals", taken as they are
    ROOT/panoptic/**.png        COCO-style panoptic PNGs (segments as colours) -> task "panoptic", taken as they are
    ROOT/categories/<name>/**   single images of category <name> (ImageNet-style)

A label file belongs to the image with the same path below its folder, without the extension
(`images/training/a.jpg` <-> `annotations/training/a.png`). Images without a label are left out of that task;
`derive` adds a colorization and/or inpainting pair for every image of `images/`. One line per record:
pair ids are `<task>/<path>`, category images `category/<name>/<path>`.
"""

from __future__ import annotations

import os
from pathlib import Path

from lvm.data.derive import DERIVED
from lvm.data.offline.sources.manifest import IMAGE_EXTS, _files

MAP_EXTS = IMAGE_EXTS | {".npy"}
TASK_FOLDERS = {  # folder -> (task, label mode for .npy files, label mode for image files)
    "annotations": ("segmentation", None, "segmentation"),
    "depth": ("depth", "depth", "depth"),
    "normals": ("normals", "normals", None),
    "panoptic": ("panoptic", None, None),
}


def _by_stem(folder: Path, exts: set[str]) -> dict[str, Path]:
    return {p.relative_to(folder).with_suffix("").as_posix(): p for p in _files(folder, exts)}


def manifest_from_labelled_tree(root: str | Path, derive: tuple[str, ...] = (), dataset: str | None = None,
                                base: str | Path | None = None) -> list[dict]:
    """Store manifest entries for the layout in the module docstring, paths relative to `base` (the manifest's
    folder; default `root`)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"folder {root} not found")
    bad = [d for d in derive if d not in DERIVED]
    if bad:
        raise ValueError(f"derive must be among {list(DERIVED)}, got {bad[0]!r}")
    dataset = dataset or root.resolve().name.replace("/", "_") or "dataset"
    base = Path(base or root).resolve()
    rel = lambda p: Path(os.path.relpath(p.resolve(), base)).as_posix()  # noqa: E731
    images = _by_stem(root / "images", IMAGE_EXTS) if (root / "images").is_dir() else {}
    entries: list[dict] = []
    for folder, (task, npy_mode, image_mode) in TASK_FOLDERS.items():
        if not (root / folder).is_dir():
            continue
        for stem, label in _by_stem(root / folder, MAP_EXTS).items():
            if stem not in images:
                continue
            mode = npy_mode if label.suffix.lower() == ".npy" else image_mode
            if label.suffix.lower() == ".npy" and mode is None:
                continue  # a NumPy array this task cannot draw
            e = {"id": f"{task}/{stem}", "kind": "pairs", "task": task, "images": [rel(images[stem]), rel(label)]}
            if mode:
                e["label"] = mode
            if mode == "segmentation":
                e["dataset"] = dataset
            entries.append(e)
    for how in derive:
        for stem, img in images.items():
            entries.append({"id": f"{how}/{stem}", "kind": "image", "derive": how, "images": [rel(img)]})
    if (root / "categories").is_dir():
        for cat in sorted(p for p in (root / "categories").iterdir() if p.is_dir()):
            for stem, img in _by_stem(cat, IMAGE_EXTS).items():
                entries.append({"id": f"category/{cat.name}/{stem}", "kind": "image", "category": cat.name,
                                "images": [rel(img)]})
    return entries


__all__ = ["manifest_from_labelled_tree", "TASK_FOLDERS"]
