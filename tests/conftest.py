"""Shared fixtures: small real corpora written to disk (images of every mode, videos, broken files)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed's CPU ops are compiled on first use into torch's extension cache. The default cache is one per user, so two
# checkouts with their own virtual environments on one machine rebuild the ops in turn (the build records the include
# paths of its venv) and every run waits for the other's build: one cache per venv.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
REPO = Path(__file__).resolve().parents[1]


def scene(seed: int, size=(256, 256)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    img = np.stack([np.sin(x * rng.uniform(3, 9)), np.cos(y * rng.uniform(3, 9)), x * y], -1)
    img = (img - img.min()) / (np.ptp(img) + 1e-9)
    return Image.fromarray((img * 255).astype(np.uint8), "RGB")


def write_mp4(path: Path, n_frames: int, seed: int = 0) -> None:
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 128, 96, "yuv420p"
        for i in range(n_frames):
            for pkt in s.encode(av.VideoFrame.from_image(scene(seed + i, (128, 96)))):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)


def write_gif(path: Path, n_frames: int, seed: int = 0) -> None:
    frames = [scene(seed + i, (64, 64)) for i in range(n_frames)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def truncate(src: Path, dst: Path, keep: float = 0.5) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])


def write_mode_images(d: Path) -> dict[str, Path]:
    """Odd but valid images: every mode the preprocessing must accept."""
    d.mkdir(parents=True, exist_ok=True)
    base = scene(1, (300, 200))
    files = {
        "rgb.png": base,
        "l.png": base.convert("L"),
        "la.png": base.convert("LA"),
        "p.png": base.convert("P"),
        "rgba.png": base.convert("RGBA"),
        "cmyk.jpg": base.convert("CMYK"),
        "gray.jpg": base.convert("L"),
        "tiny.png": Image.new("RGB", (1, 1), (200, 10, 10)),
        "bits.png": base.convert("1"),
    }
    out = {}
    for name, img in files.items():
        img.save(d / name)
        out[name] = d / name
    p_t = base.convert("P")
    p_t.info["transparency"] = 0
    p_t.save(d / "p_transparent.png", transparency=0)
    out["p_transparent.png"] = d / "p_transparent.png"
    arr16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(arr16).save(d / "i16.png")
    out["i16.png"] = d / "i16.png"
    return out


def write_broken(d: Path, good_png: Path, good_jpg: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    truncate(good_png, d / "truncated.png")
    truncate(good_jpg, d / "truncated.jpg", 0.3)
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("this is not an image\n")
    Image.new("1", (10000, 9000)).save(d / "bomb.png")  # 90M pixels, a few kB on disk
    (d / "garbage.mp4").write_bytes(os.urandom(4096))
    return {p.name: p for p in d.iterdir()}


def make_mixed_corpus(root: Path) -> dict:
    """A manifest with every kind, every image mode, and every kind of broken input."""
    root.mkdir(parents=True, exist_ok=True)
    modes = write_mode_images(root / "modes")
    broken = write_broken(root / "broken", modes["rgb.png"], modes["gray.jpg"])
    (root / "seq").mkdir()
    for i in range(5):
        scene(10 + i).save(root / "seq" / f"{i}.png")
    write_mp4(root / "clip.mp4", 7)
    write_gif(root / "anim.gif", 5)
    lines = [{"id": f"mode-{n}", "kind": "image", "images": [f"modes/{n}"]} for n in sorted(modes)]
    lines += [
        {"id": "seq", "kind": "sequence", "images": [f"seq/{i}.png" for i in range(5)]},
        {"id": "pairs", "kind": "pairs", "images": ["seq/0.png", "modes/l.png", "seq/1.png", "modes/bits.png"]},
        {"id": "mp4", "kind": "video", "video": "clip.mp4", "max_frames": 16},
        {"id": "mp4-stride", "kind": "video", "video": "clip.mp4", "max_frames": 3, "stride": 2},
        {"id": "gif", "kind": "video", "video": "anim.gif"},
        {"id": "long", "kind": "sequence", "images": [f"seq/{i % 5}.png" for i in range(20)]},
    ]
    bad = {f"bad-{n}": n for n in ("truncated.png", "truncated.jpg", "empty.png", "text.png", "bomb.png")}
    lines += [{"id": k, "kind": "image", "images": [f"broken/{n}"]} for k, n in bad.items()]
    lines += [
        {"id": "bad-missing", "kind": "image", "images": ["broken/nope.png"]},
        {"id": "bad-video", "kind": "video", "video": "broken/garbage.mp4"},
        {"id": "bad-seq", "kind": "sequence", "images": ["seq/0.png", "broken/truncated.png", "seq/2.png"]},
    ]
    text = "\n".join(json.dumps(x) for x in lines)
    text += '\n{"not json\n{"id": "nokind", "images": ["seq/0.png"]}\n'
    text += json.dumps({"id": "oddpairs", "kind": "pairs", "images": ["seq/0.png"] * 3}) + "\n"
    (root / "manifest.jsonl").write_text(text)
    n_bad_sources = len(bad) + 3
    return {"manifest": root / "manifest.jsonl", "modes": modes, "broken": broken,
            "bad_ids": [*bad, "bad-missing", "bad-video", "bad-seq"], "n_bad_sources": n_bad_sources,
            "n_malformed_lines": 3}


@pytest.fixture(scope="session")
def mixed_corpus(tmp_path_factory) -> dict:
    return make_mixed_corpus(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A patch-kmeans tokenizer fitted (quickly) on a few real scenes; saved to disk."""
    from lvm.tokenizer.patch_kmeans import PatchKMeansTokenizer
    from lvm.tokenizer.preprocess import prepare_image

    frames = np.stack([prepare_image(scene(s)) for s in range(40)])
    tok = PatchKMeansTokenizer.fit(frames, seed=0, iters=3)
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory, small_tokenizer):
    """Real shards of a small synthetic corpus (videos, sequences, pairs, images)."""
    from lvm.data.offline.config import BuildConfig
    from lvm.data.offline.pipeline import build_shards
    from lvm.data.synth import CorpusSize, make_corpus

    root = tmp_path_factory.mktemp("train_data")
    manifest = make_corpus(root / "corpus", seed=7, size=CorpusSize(videos=6, gifs=1, sequences=3, frames=8, pairs_per_task=8, images=12))
    out = root / "shards"
    build_shards(BuildConfig(inputs=[str(manifest)], out=str(out), tokenizer=f"patch-kmeans:{small_tokenizer}",
                             workers=0, val_fraction=0.25, sentences_per_shard=8, progress=False))
    return out
