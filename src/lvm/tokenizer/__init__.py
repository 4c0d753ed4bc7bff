"""Image <-> 256 visual codes.

    from lvm.tokenizer import load_tokenizer
    tok = load_tokenizer("vqgan:/path/to/vqgan")   # or "patch-kmeans:/path/to/codebook"
    codes = tok.encode(pixels)    # float [B,3,256,256] in [0,1] -> long [B,256] in 0..8191
    images = tok.decode(codes)    # long [B,256] -> float [B,3,256,256] in [0,1]

Specs: `vqgan:<dir>` (the paper's MaskGIT/MUSE VQGAN, local weights only) and
`patch-kmeans:<dir>` (the embedded default, fitted by `make shards` and saved beside the shards).
"""

from __future__ import annotations

from pathlib import Path

from lvm.tokenizer.patch_kmeans import PatchKMeansTokenizer
from lvm.tokenizer.vqgan import VQGANTokenizer

KINDS = ("vqgan", "patch-kmeans")


def parse_spec(spec: str) -> tuple[str, str | None]:
    kind, _, path = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer {spec!r}: expected one of vqgan:<dir>, patch-kmeans[:<dir>]")
    return kind, path or None


def load_tokenizer(spec: str, device=None):
    """Build a tokenizer from its spec string; never downloads anything."""
    kind, path = parse_spec(spec)
    if path is None:
        raise ValueError(f"tokenizer {spec!r} needs a folder: {kind}:<dir>"
                         + (" (make_shards.py fits one when given plain 'patch-kmeans')" if kind == "patch-kmeans" else ""))
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    if kind == "vqgan":
        return VQGANTokenizer.from_dir(path, device)
    return PatchKMeansTokenizer.load(path)


__all__ = ["load_tokenizer", "parse_spec", "PatchKMeansTokenizer", "VQGANTokenizer"]
