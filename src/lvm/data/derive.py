"""Images made from other images or from label maps, as LVM made its annotated pairs.

Derived tasks (applied to the preprocessed 256x256 uint8 frame, deterministic from a seed and the record id):
- colorization: the input is the ITU-R 601 grey image (0.2989 R + 0.5870 G + 0.1140 B, rounded, in all three
  channels); the label is the colour image.
- inpainting: with probability `hole_ratio` (LVM: 0.3) a square hole with a side of 10-50% of the image's short
  side is set to 0; otherwise a ratio r ~ U(0, 1) is drawn and every 32x32 patch is set to 0 with probability r
  (LVM's two mask styles). The label is the unmasked image.

Label maps become colour images (then preprocessed like any image):
- segmentation: a PNG of class ids (8-bit grey or palette PNG; 0..255) is coloured by the dataset's palette
  (256 RGB colours, `palette_for`): an indexed image whose resize is nearest-neighbour, so class boundaries never
  blend into colours of no class.
- depth: a 16-bit PNG (or any grey PNG) or a `.npy` array [H, W] is normalised per image over its valid pixels
  (> 0 and finite; the others are black) and coloured by `COLOUR_MAP`, a fixed 256-entry map (the "turbo"
  polynomial approximation: near for blue, far for red).
- normals: a `.npy` array [H, W, 3] with components in [-1, 1] becomes (n + 1) / 2 * 255 in R, G, B. A normal map
  already stored as an 8-bit colour PNG is an ordinary image: give it no `label` mode.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from lvm.tokenizer.preprocess import SourceError, open_image, prepare_image, resize_to_square

DERIVED = ("colorization", "inpainting")
LABEL_MAPS = ("segmentation", "depth", "normals")
DEFAULT_HOLE_RATIO = 0.3  # LVM's share of inpainting inputs with one square hole
PATCH = 32                # LVM's inpainting patch size
GREY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140])
PALETTE_SIZE = 256


def record_rng(seed: int, record_id: str) -> np.random.Generator:
    """The generator of one record: depends only on the seed and the record's id (not on units, ranks or order)."""
    digest = hashlib.sha256(record_id.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def colorization_input(frame: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> its ITU-R 601 grey version, 3 equal channels."""
    grey = np.rint(frame.astype(np.float64) @ GREY_WEIGHTS).clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def inpainting_input(frame: np.ndarray, rng: np.random.Generator, hole_ratio: float = DEFAULT_HOLE_RATIO,
                     patch: int = PATCH) -> np.ndarray:
    """uint8 [H, W, 3] -> a masked copy (one square hole, or 32-px patches masked at a random ratio)."""
    h, w, _ = frame.shape
    out = frame.copy()
    if rng.random() < hole_ratio:
        short = min(h, w)
        size = int(rng.integers(max(1, int(0.1 * short)), max(2, int(0.5 * short))))
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        out[top : top + size, left : left + size] = 0
        return out
    ratio = rng.random()
    gh, gw = -(-h // patch), -(-w // patch)
    masked = rng.random((gh, gw)) < ratio
    full = np.repeat(np.repeat(masked, patch, 0), patch, 1)[:h, :w]
    out[full] = 0
    return out


def derive_input(task: str, frame: np.ndarray, seed: int, record_id: str, hole_ratio: float = DEFAULT_HOLE_RATIO) -> np.ndarray:
    """The input image of a derived pair whose label is `frame`."""
    if task == "colorization":
        return colorization_input(frame)
    if task == "inpainting":
        return inpainting_input(frame, record_rng(seed, record_id), hole_ratio)
    raise ValueError(f"'derive' must be one of {list(DERIVED)}, got {task!r}")


# ----------------------------------------------------------------------------------------------
# Label maps -> colour images


def default_palette(dataset: str) -> np.ndarray:
    """A fixed palette of 256 RGB colours for a dataset: class 0 black, the others drawn from a generator seeded by
    the dataset's name (so a dataset always gets the same colours, wherever and whenever it is tokenized)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(dataset.encode()).digest()[:8], "little"))
    pal = rng.integers(0, 256, (PALETTE_SIZE, 3), dtype=np.uint8)
    pal[0] = 0
    return pal


def palette_for(dataset: str, folder: Path | None) -> np.ndarray:
    """The palette of `dataset`: `folder/<dataset>.json` where it exists (a list of [R, G, B]; put your own there
    before tokenizing), else `default_palette`."""
    if folder is not None and (folder / f"{dataset}.json").is_file():
        pal = np.asarray(json.loads((folder / f"{dataset}.json").read_text()), dtype=np.int64)
        if pal.ndim != 2 or pal.shape[1] != 3 or not 1 <= len(pal) <= PALETTE_SIZE or pal.min() < 0 or pal.max() > 255:
            raise ValueError(f"palette {folder / f'{dataset}.json'} must be a list of 1..256 [R, G, B] values in 0..255")
        full = np.zeros((PALETTE_SIZE, 3), np.uint8)
        full[: len(pal)] = pal
        return full
    return default_palette(dataset)


def palette_json(palette: np.ndarray) -> str:
    return json.dumps(palette.astype(int).tolist())


def _turbo(n: int = 256) -> np.ndarray:
    """Google's polynomial approximation of the turbo colour map, n entries (uint8 [n, 3])."""
    x = np.linspace(0.0, 1.0, n)
    powers = np.stack([x**k for k in range(6)], -1)
    coef = np.array([[0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
                     [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
                     [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973]])
    return np.rint((powers @ coef.T).clip(0, 1) * 255).astype(np.uint8)


COLOUR_MAP = _turbo()


def _read_map(path: str) -> np.ndarray:
    """A label map file -> its array: `.npy` as stored, an image as its integer values (no colour conversion)."""
    if path.lower().endswith(".npy"):
        if not Path(path).is_file():
            raise SourceError("file not found")
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise SourceError(f"unreadable .npy label map: {e}") from None
    img = open_image(path)
    if img.mode in ("P", "L", "I;16", "I;16B", "I;16L", "I", "F"):
        return np.asarray(img)
    if img.mode in ("RGB", "RGBA", "LA"):  # a grey map saved with colour channels: equal channels only
        arr = np.asarray(img.convert("RGB"))
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise SourceError(f"label map is a colour image (mode {img.mode}), not a map of values")
        return arr[..., 0]
    raise SourceError(f"label map of unsupported image mode {img.mode}")


def segmentation_image(classes: np.ndarray, palette: np.ndarray) -> Image.Image:
    """Class ids [H, W] (0..255) -> an indexed image with the palette (resized by nearest neighbour)."""
    if classes.ndim != 2:
        raise SourceError(f"segmentation map must be [H, W] class ids, got shape {list(classes.shape)}")
    if classes.size and (classes.min() < 0 or classes.max() >= PALETTE_SIZE):
        raise SourceError(f"segmentation class id {int(classes.max())} outside 0..{PALETTE_SIZE - 1}")
    img = Image.fromarray(classes.astype(np.uint8), "P")
    img.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    return img


def depth_image(depth: np.ndarray) -> Image.Image:
    """Depth [H, W] -> colours of COLOUR_MAP, normalised per image over valid pixels (> 0, finite); others black."""
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise SourceError(f"depth map must be [H, W], got shape {list(depth.shape)}")
    d = depth.astype(np.float64)
    valid = np.isfinite(d) & (d > 0)
    out = np.zeros((*d.shape, 3), np.uint8)
    if valid.any():
        lo, hi = d[valid].min(), d[valid].max()
        level = np.rint((d[valid] - lo) / max(hi - lo, 1e-12) * (len(COLOUR_MAP) - 1)).astype(np.int64)
        out[valid] = COLOUR_MAP[level]
    return Image.fromarray(out, "RGB")


def normals_image(normals: np.ndarray) -> Image.Image:
    """Surface normals [H, W, 3] in [-1, 1] -> (n + 1) / 2 * 255 as RGB."""
    if normals.ndim != 3 or normals.shape[-1] != 3:
        raise SourceError(f"normal map must be [H, W, 3], got shape {list(normals.shape)}")
    n = np.nan_to_num(normals.astype(np.float64)).clip(-1, 1)
    return Image.fromarray(np.rint((n + 1) / 2 * 255).astype(np.uint8), "RGB")


def label_frame(path: str, mode: str, palette: np.ndarray | None, resize: str = "squash") -> np.ndarray:
    """A label map file -> the preprocessed colour frame (uint8 [256, 256, 3]); SourceError on a bad file."""
    arr = _read_map(path)
    if mode == "segmentation":  # resized while indexed (nearest neighbour), then made RGB
        img = resize_to_square(segmentation_image(arr, palette), resize=resize)
    elif mode == "depth":
        img = depth_image(arr)
    elif mode == "normals":
        img = normals_image(arr)
    else:
        raise ValueError(f"'label' must be one of {list(LABEL_MAPS)}, got {mode!r}")
    return prepare_image(img, resize=resize)


__all__ = ["DERIVED", "LABEL_MAPS", "DEFAULT_HOLE_RATIO", "COLOUR_MAP", "record_rng", "colorization_input",
           "inpainting_input", "derive_input", "default_palette", "palette_for", "palette_json", "segmentation_image",
           "depth_image", "normals_image", "label_frame"]
