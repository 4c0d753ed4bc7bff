"""The embedded default tokenizer: a k-means codebook over 16x16 patches (the iGPT idea).

It needs no downloaded weights, is fitted deterministically on the corpus being tokenized, and keeps
the paper's token geometry: a 256x256 image is a 16x16 grid of patches, one code in 0..8191 each.

A patch is described by its `grid x grid` cell means in RGB (grid=4: 4x4 cells of 4x4 pixels,
48 numbers). Encoding is a nearest-centroid search; decoding places each centroid's cells back on a
64x64 image and upsamples it bilinearly to 256x256, which hides patch seams. State (centroids and
settings) is saved as `codebook.safetensors` + `config.json` so shards can always be decoded later.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lvm.model.vocab import CODEBOOK_SIZE, IMAGE_SIZE, TOKENS_PER_IMAGE

PATCH = 16


def patch_features(pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, 3, 256, 256] in [0,1] -> [B, 256, 3*grid*grid] cell means per 16x16 patch."""
    b = pixels.shape[0]
    side = IMAGE_SIZE // PATCH
    cells = F.avg_pool2d(pixels.float(), PATCH // grid)  # [B, 3, 16*grid, 16*grid]
    cells = cells.view(b, 3, side, grid, side, grid).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(b, side * side, 3 * grid * grid)


def features_to_pixels(feats: torch.Tensor, grid: int) -> torch.Tensor:
    """Inverse of `patch_features` up to the pooling: [B, 256, 3*g*g] -> [B, 3, 256, 256]."""
    b = feats.shape[0]
    side = IMAGE_SIZE // PATCH
    cells = feats.view(b, side, side, 3, grid, grid).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, side * grid, side * grid)
    return F.interpolate(cells, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp_(0, 1)


def nearest(x: torch.Tensor, centroids: torch.Tensor, c_sq: torch.Tensor, chunk: int = 16384):
    """Index of, and squared distance to, the nearest centroid for each row of x."""
    idx = torch.empty(x.shape[0], dtype=torch.long)
    d_min = torch.empty(x.shape[0])
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk]
        d = torch.addmm(c_sq[None], xs, centroids.t(), alpha=-2.0)  # |c|^2 - 2 x.c
        v, i = d.min(1)
        idx[s : s + chunk] = i
        d_min[s : s + chunk] = (v + xs.pow(2).sum(1)).clamp_(min=0)
    return idx, d_min


def fit_kmeans(x: torch.Tensor, k: int, iters: int, seed: int) -> tuple[torch.Tensor, float]:
    """Lloyd's k-means, deterministic for a seed. Empty clusters take the worst-fitted points."""
    gen = np.random.default_rng(seed)
    n = x.shape[0]
    init = gen.choice(n, size=k, replace=n < k)
    centroids = x[torch.from_numpy(init)].clone()
    for _ in range(iters):
        idx, d = nearest(x, centroids, centroids.pow(2).sum(1))
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k)
        alive = counts > 0
        centroids[alive] = sums[alive] / counts[alive, None].float()
        n_dead = int((~alive).sum())
        if n_dead:
            order = torch.argsort(d, descending=True, stable=True)
            worst = order[torch.arange(n_dead) % len(order)]  # fewer points than codes: reuse them
            centroids[~alive] = x[worst]
    _, d = nearest(x, centroids, centroids.pow(2).sum(1))
    return centroids, float(d.mean())


class PatchKMeansTokenizer:
    kind = "patch-kmeans"

    def __init__(self, centroids: torch.Tensor, grid: int = 4, spec: str = "patch-kmeans", meta: dict | None = None):
        if centroids.shape != (CODEBOOK_SIZE, 3 * grid * grid):
            raise ValueError(f"patch-kmeans codebook must be [{CODEBOOK_SIZE}, {3 * grid * grid}], got {list(centroids.shape)}")
        self.centroids = centroids.float().contiguous()
        self.c_sq = self.centroids.pow(2).sum(1)
        self.grid = grid
        self.spec = spec
        self.meta = meta or {}
        self.codebook_size = CODEBOOK_SIZE
        self.image_size = IMAGE_SIZE
        self.tokens_per_image = TOKENS_PER_IMAGE

    @classmethod
    def fit(cls, frames: np.ndarray, grid: int = 4, seed: int = 0, iters: int = 10, max_samples: int = 65_536):
        """Fit on uint8 frames [N, 256, 256, 3] (a deterministic sample of the corpus)."""
        from lvm.tokenizer.preprocess import to_pixels

        feats = torch.cat([patch_features(to_pixels(frames[s : s + 256]), grid).reshape(-1, 3 * grid * grid)
                           for s in range(0, len(frames), 256)])
        if feats.shape[0] > max_samples:
            keep = np.sort(np.random.default_rng(seed).choice(feats.shape[0], max_samples, replace=False))
            feats = feats[torch.from_numpy(keep)]
        centroids, mse = fit_kmeans(feats, CODEBOOK_SIZE, iters, seed)
        meta = {"fit_images": int(len(frames)), "fit_patches": int(feats.shape[0]), "iters": iters,
                "seed": seed, "fit_feature_mse": mse}
        return cls(centroids, grid, meta=meta)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = patch_features(pixels.cpu(), self.grid)
        idx, _ = nearest(feats.reshape(-1, feats.shape[-1]), self.centroids, self.c_sq)
        return idx.view(pixels.shape[0], TOKENS_PER_IMAGE)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.long().cpu()
        if codes.numel() and (codes.min() < 0 or codes.max() >= CODEBOOK_SIZE):
            raise ValueError(f"codes must lie in 0..{CODEBOOK_SIZE - 1}")
        return features_to_pixels(self.centroids[codes], self.grid)

    def save(self, path: str | Path) -> None:
        """Atomically write config.json + codebook.safetensors into `path`."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / "codebook.safetensors.tmp"
        save_file({"centroids": self.centroids}, str(tmp))
        tmp.replace(path / "codebook.safetensors")
        cfg = {"type": self.kind, "grid": self.grid, "codebook_size": CODEBOOK_SIZE, "image_size": IMAGE_SIZE,
               "tokens_per_image": TOKENS_PER_IMAGE, **self.meta}
        tmp = path / "config.json.tmp"
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        tmp.replace(path / "config.json")
        self.spec = f"patch-kmeans:{path}"

    @classmethod
    def load(cls, path: str | Path) -> PatchKMeansTokenizer:
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file, weights = path / "config.json", path / "codebook.safetensors"
        if not (cfg_file.is_file() and weights.is_file()):
            raise FileNotFoundError(f"patch-kmeans tokenizer: {path} lacks config.json or codebook.safetensors")
        cfg = json.loads(cfg_file.read_text())
        meta = {k: v for k, v in cfg.items() if k not in ("type", "grid", "codebook_size", "image_size", "tokens_per_image")}
        return cls(load_file(str(weights))["centroids"], cfg["grid"], f"patch-kmeans:{path}", meta)

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "grid": self.grid, **self.meta}
