"""The embedded demo corpus: every data kind, generated deterministically from a seed in seconds.

Layout (the folder-tree convention of `manifest_from_tree`):
    videos/clip_XXX.mp4 and .gif     moving and rotating shapes on textured backgrounds
    sequences/seq_XXX/frame_YY.png   the same kind of motion stored as image sequences
    pairs/{edges,mask,invert}/{input,label}/NNN.png    image -> annotation examples
    images/img_XXX.png               single images
    manifest.jsonl                   written from the tree
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from lvm.data.offline.sources.manifest import manifest_from_tree, write_manifest

SIZE = 256
PAIR_TASKS = ("edges", "mask", "invert")


@dataclass(frozen=True)
class CorpusSize:
    """The demo corpus: mostly short videos. A model learns the frame-to-frame structure from many distinct clips;
    from a few long ones it memorises token pairs instead (docs/learning.md)."""

    videos: int = 200
    gifs: int = 8
    sequences: int = 8
    frames: int = 8
    pairs_per_task: int = 8
    images: int = 32


def background(rng: np.random.Generator) -> Image.Image:
    """A smooth colour gradient with sinusoidal stripes and a little noise."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 10)
    t = np.cos(angle) * x + np.sin(angle) * y
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * t)[..., None]
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img = 0.75 * img + 0.25 * stripes * rng.uniform(0.3, 1, 3)
    img += rng.normal(0, 0.02, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


@dataclass
class Shape:
    kind: str
    cx: float
    cy: float
    r: float
    angle: float
    colour: tuple[int, int, int]
    vx: float = 0.0
    vy: float = 0.0
    spin: float = 0.0

    def polygon(self, t: float) -> list[tuple[float, float]]:
        cx, cy = (self.cx + self.vx * t) % SIZE, (self.cy + self.vy * t) % SIZE
        a = self.angle + self.spin * t
        n = {"triangle": 3, "square": 4, "pentagon": 5, "circle": 32}[self.kind]
        return [(cx + self.r * np.cos(a + 2 * np.pi * k / n), cy + self.r * np.sin(a + 2 * np.pi * k / n)) for k in range(n)]


def random_shapes(rng: np.random.Generator, moving: bool) -> list[Shape]:
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        s = Shape(kind=str(rng.choice(["triangle", "square", "pentagon", "circle"])),
                  cx=float(rng.uniform(40, SIZE - 40)), cy=float(rng.uniform(40, SIZE - 40)),
                  r=float(rng.uniform(18, 50)), angle=float(rng.uniform(0, 2 * np.pi)),
                  colour=tuple(int(v) for v in rng.integers(0, 256, 3)))
        if moving:
            s.vx, s.vy = float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8))
            s.spin = float(rng.uniform(-0.3, 0.3))
        shapes.append(s)
    return shapes


def render(bg: Image.Image, shapes: list[Shape], t: float = 0.0) -> tuple[Image.Image, Image.Image]:
    """The scene at time t, and its binary shape mask."""
    img, mask = bg.copy(), Image.new("L", (SIZE, SIZE), 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for s in shapes:
        poly = s.polygon(t)
        draw.polygon(poly, fill=s.colour, outline=(0, 0, 0))
        mdraw.polygon(poly, fill=255)
    return img, mask


def annotate(task: str, img: Image.Image, mask: Image.Image) -> Image.Image:
    if task == "edges":
        return ImageOps.autocontrast(img.convert("L").filter(ImageFilter.FIND_EDGES)).convert("RGB")
    if task == "mask":
        return mask.convert("RGB")
    if task == "invert":
        return ImageOps.invert(img)
    raise ValueError(task)


def write_video(frames: list[Image.Image], path: Path, fps: int = 8) -> None:
    import av

    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    with av.open(str(tmp), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_image(f)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(path)


def write_gif(frames: list[Image.Image], path: Path) -> None:
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)


def make_corpus(out: str | Path, seed: int = 0, size: CorpusSize = CorpusSize()) -> Path:
    """Write the demo corpus into `out`; returns the manifest path. Same seed => same corpus."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for sub in ("videos", "images"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    def clip(moving=True):
        bg, shapes = background(rng), random_shapes(rng, moving)
        return [render(bg, shapes, t)[0] for t in range(size.frames)]

    for i in range(size.videos):
        write_video(clip(), out / "videos" / f"clip_{i:03d}.mp4")
    for i in range(size.gifs):
        write_gif(clip(), out / "videos" / f"anim_{i:03d}.gif")
    for i in range(size.sequences):
        d = out / "sequences" / f"seq_{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        for j, frame in enumerate(clip()):
            frame.save(d / f"frame_{j:02d}.png")
    for task in PAIR_TASKS:
        for part in ("input", "label"):
            (out / "pairs" / task / part).mkdir(parents=True, exist_ok=True)
        for i in range(size.pairs_per_task):
            img, mask = render(background(rng), random_shapes(rng, False))
            img.save(out / "pairs" / task / "input" / f"{i:03d}.png")
            annotate(task, img, mask).save(out / "pairs" / task / "label" / f"{i:03d}.png")
    for i in range(size.images):
        render(background(rng), random_shapes(rng, False))[0].save(out / "images" / f"img_{i:03d}.png")

    manifest = out / "manifest.jsonl"
    write_manifest(manifest_from_tree(out), manifest)
    (out / "corpus.json").write_text(json.dumps({"seed": seed, **size.__dict__}, indent=2))
    return manifest


def copy_task(n_sentences: int, frames: int, codes: int = 1024, redraw: float = 0.1, block: int = 2, seed: int = 0,
              shuffle_frames: bool = False) -> list[np.ndarray]:
    """A token-level task that needs context. A frame is a 16x16 grid of `block` x `block` blocks, each block one
    code of `codes` (neighbouring tokens agree, as in images); frame 0 draws every block, and every later frame
    repeats the one before it but for a share `redraw` of its blocks, drawn again. A model that copies from the
    previous frame (attention to the same position one frame back, 256 tokens earlier) predicts all but the
    redrawn blocks; without a previous frame only the tokens after a block's first are predictable.
    `shuffle_frames` is the negative control: the same frames shuffled across sentences, so no frame says
    anything about the next."""
    rng = np.random.default_rng(seed)
    side = 16 // block
    out = []
    for _ in range(n_sentences):
        f = [rng.integers(0, codes, (side, side))]
        for _ in range(frames - 1):
            nxt = f[-1].copy()
            pos = rng.random((side, side)) < redraw
            nxt[pos] = rng.integers(0, codes, int(pos.sum()))
            f.append(nxt)
        out.append(np.stack(f).repeat(block, axis=1).repeat(block, axis=2))
    if shuffle_frames:
        pool = np.concatenate(out)
        pool = pool[rng.permutation(len(pool))]
        out = [pool[i * frames : (i + 1) * frames] for i in range(n_sentences)]
    return [s.reshape(-1).astype(np.uint16) for s in out]
