"""The tokenizer of a run: the embedded patch-kmeans tokenizer fitted once on the corpus, or one loaded.

The embedded tokenizer is fitted once, as its own step (`--fit-only`, or implicitly by a single-process run),
on a deterministic sample across units: units in a seeded order, the first train images of each, until
`fit_images`; it is written to `OUT/tokenizer` atomically. Ranks of a multi-rank run only load it.
`tokenizer_info` is what `OUT/tokenizer.json` records of it (`lvm.artifacts.TokenizerRecord`).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from lvm.artifacts import TokenizerRecord
from lvm.data.offline.decode import decoded_stream
from lvm.data.offline.sources import Skip
from lvm.data.offline.units import Unit
from lvm.data.offline.writer import is_val
from lvm.data.shards.format import temp_path
from lvm.tokenizer import load_tokenizer, parse_spec
from lvm.tokenizer.patch_kmeans import PatchKMeansTokenizer


def fit_sample(cfg, units: list[Unit], pool) -> np.ndarray:
    """Frames for fitting the embedded tokenizer: units in a seeded order, up to `quota` train images
    from the start of each, until `fit_images` (deterministic; reads only the units it samples)."""
    order = np.random.default_rng(cfg.seed).permutation(len(units))
    quota = max(32, math.ceil(cfg.fit_images / max(len(units), 1)))
    frames, n = [], 0
    for u in order:
        got = 0
        for item in decoded_stream(units[u], cfg, pool):
            if isinstance(item, Skip) or is_val(item[0].id, cfg.val_fraction):
                continue
            frames.append(item[1])
            got += len(item[1])
            if got >= quota or n + got >= cfg.fit_images:
                break
        n += got
        if n >= cfg.fit_images:
            break
    if not frames:
        raise SystemExit("error: no decodable image to fit the patch-kmeans tokenizer on")
    return np.concatenate(frames)[: cfg.fit_images]


def fitted_tokenizer_dir(cfg) -> Path | None:
    """OUT/tokenizer when the tokenizer is the embedded one to fit on this corpus, else None."""
    kind, path = parse_spec(cfg.tokenizer)
    return Path(cfg.out) / "tokenizer" if kind == "patch-kmeans" and path is None else None


def fit_tokenizer(cfg, units: list[Unit], pool) -> PatchKMeansTokenizer:
    tok_dir = fitted_tokenizer_dir(cfg)
    if (tok_dir / "config.json").is_file():
        return PatchKMeansTokenizer.load(tok_dir)
    tok = PatchKMeansTokenizer.fit(fit_sample(cfg, units, pool), seed=cfg.seed)
    tmp = temp_path(tok_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save(tmp)
    try:
        tmp.rename(tok_dir)
    except OSError:  # another process finished first: theirs is identical (same sample, same seed)
        shutil.rmtree(tmp, ignore_errors=True)
    return PatchKMeansTokenizer.load(tok_dir)


def resolve_tokenizer(cfg, units: list[Unit], pool, device):
    """The run's tokenizer: --tokenizer loaded on `device`, or the embedded one (loaded, or fitted here by a
    single-process run; SystemExit for ranks that find it missing)."""
    tok_dir = fitted_tokenizer_dir(cfg)
    if tok_dir is None:
        return load_tokenizer(cfg.tokenizer, device)
    if (tok_dir / "config.json").is_file():
        return PatchKMeansTokenizer.load(tok_dir)
    if cfg.world_size > 1 or cfg.index_only:
        raise SystemExit(f"error: no fitted tokenizer in {tok_dir}: run make_shards.py --fit-only with the same "
                         "--input and --out once before the ranks (or pass --tokenizer)")
    return fit_tokenizer(cfg, units, pool)


def tokenizer_info(tok, out: Path, cfg) -> dict:
    """tokenizer.json of OUT (`lvm.artifacts.TokenizerRecord`: a folder inside OUT relative, so the folder can
    move; the weights' digest)."""
    return TokenizerRecord.of_tokenizer(tok, cfg.resize).to_info(relative_to=out)


__all__ = ["fit_sample", "fitted_tokenizer_dir", "fit_tokenizer", "resolve_tokenizer", "tokenizer_info"]
