"""Image decoding and preprocessing: one function turns any image file into a 256x256 RGB array.

Policy (LVM resized every image to 256x256; we do the same by default):
- EXIF orientation is applied.
- Every mode becomes RGB. 16/32-bit integer images are scaled by their bit depth (not clipped),
  float images are taken as [0, 1]; alpha (RGBA, LA, P with transparency) is composited on white;
  CMYK, YCbCr, palette and 1-bit images go through Pillow's conversion.
- `resize="squash"` (default, as LVM did) resizes the whole image to 256x256, changing the aspect
  ratio; `resize="center-crop"` resizes the short side to 256 and crops the centre.
- Downscaling uses Pillow's antialiased bicubic filter.

Anything that is not a complete, valid image raises `SourceError` with a one-line reason: missing
file, empty file, not an image, truncated data (never padded with grey), or a decompression bomb.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lvm.model.vocab import IMAGE_SIZE

RESIZE_MODES = ("squash", "center-crop")
# Pillow's default bomb limit (~89M pixels) is also ours; over it an image is refused, not decoded.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never padded with grey


class SourceError(Exception):
    """A source (image, video, manifest line) that cannot be used; the message is the reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_to_square(img: Image.Image, size: int = IMAGE_SIZE, resize: str = "squash") -> Image.Image:
    if resize == "squash":
        return img.resize((size, size), Image.BICUBIC)
    if resize == "center-crop":
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


def prepare_image(img: Image.Image, size: int = IMAGE_SIZE, resize: str = "squash") -> np.ndarray:
    """A decoded PIL image -> uint8 array [size, size, 3]."""
    img = _to_rgb(ImageOps.exif_transpose(img) or img)
    return np.asarray(resize_to_square(img, size, resize), dtype=np.uint8).copy()


def open_image(source: str | os.PathLike | bytes, draft: int | None = None) -> Image.Image:
    """Open and fully decode an image file (path or bytes), raising SourceError on any defect.

    `draft`: a JPEG is decoded directly at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both
    sides >= draft pixels, several times faster for large photos; the final resize is unchanged."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise SourceError("file not found")
        data = path.read_bytes()
    else:
        data = bytes(source)
    if not data:
        raise SourceError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise SourceError(f"decompression bomb: {w}x{h} pixels exceeds {MAX_IMAGE_PIXELS}")
            if draft and img.format == "JPEG" and min(w, h) >= 2 * draft:
                img.draft(img.mode, (draft, draft))
            img.load()
    except SourceError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SourceError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise SourceError("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SourceError(f"corrupt or truncated image: {e}") from None
    if img.width < 1 or img.height < 1:
        raise SourceError("image has no pixels")
    return img


def load_image(source: str | os.PathLike | bytes, size: int = IMAGE_SIZE, resize: str = "squash") -> np.ndarray:
    """THE preprocessing function: file -> uint8 RGB array [size, size, 3] (see module docstring)."""
    return prepare_image(open_image(source, draft=size), size, resize)


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float tensor [..., 3, H, W] in [0, 1], the tokenizers' input."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float().div_(255.0)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float tensor [..., 3, H, W] in [0, 1] -> uint8 array [..., H, W, 3]."""
    return pixels.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()
