"""Corpora of the GPU check: random token sentences (throughput), synthetic videos (learning), prompt frames."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

try:
    import numpy as np
except ImportError:  # reported by no_gpu_reason with the rest of what is missing
    np = None


def random_source(folder: Path, sentences: int, frames: int = 16, seed: int = 0) -> Path:
    """A training source of random video sentences (throughput only), with the tokenizer.json training reads."""
    from lvm.data.shards.format import write_shard

    rng = np.random.default_rng(seed)
    rows = [{"tokens": rng.integers(0, 8192, 256 * frames, dtype=np.uint16), "n_images": frames, "kind": "video",
             "id": f"random-{i}"} for i in range(sentences)]
    write_shard(folder / "train" / "random-00000.arrow", rows)
    (folder / "tokenizer.json").write_text(json.dumps({"spec": "random", "kind": "random", "codebook_size": 8192,
                                                      "image_size": 256, "tokens_per_image": 256,
                                                      "details": {"kind": "random tokens (throughput only)"}}))
    return folder


def _write_videos(job: tuple) -> int:
    root, indices, seed, frames = job
    from lvm.data.synth import background, random_shapes, render, write_video

    for i in indices:
        rng = np.random.default_rng([seed, i])
        bg, shapes = background(rng), random_shapes(rng, moving=True)
        write_video([render(bg, shapes, t)[0] for t in range(frames)], Path(root) / "videos" / f"clip_{i:05d}.mp4")
    return len(indices)


def video_corpus(root: Path, n: int, workers: int, seed: int = 0, frames: int = 16) -> Path:
    """n synthetic videos (moving, rotating shapes on textured backgrounds: `lvm.data.synth`), and their manifest."""
    from lvm.data.offline.sources.manifest import manifest_from_tree, write_manifest

    (root / "videos").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), list(range(k, n, workers)), seed, frames) for k in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        assert sum(pool.map(_write_videos, jobs)) == n
    write_manifest(manifest_from_tree(root), root / "manifest.jsonl")
    return root / "manifest.jsonl"


def prompt_frames(shards: Path, manifest: Path, folder: Path, n: int) -> list[Path] | None:
    """The first n frames of the first held-out video, as PNG files."""
    from PIL import Image

    from lvm.data.offline.decode import decode_sentence
    from lvm.data.offline.sources.manifest import read_manifest
    from lvm.data.shards.shard_set import load_sentences

    val = load_sentences(shards / "val")
    ids = [str(i) for i, k in zip(val.ids, val.kinds, strict=True) if k == "video"]
    if not ids:
        return None
    sentence = next(s for s in read_manifest(manifest).sentences if s.id == ids[0])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(decode_sentence(sentence)[:n]):
        Image.fromarray(frame).save(folder / f"frame_{i}.png")
        paths.append(folder / f"frame_{i}.png")
    return paths
