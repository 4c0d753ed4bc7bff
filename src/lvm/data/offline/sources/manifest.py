"""The corpus manifest: JSONL, one visual sentence per line.

    {"images": ["a.png", "b.jpg"], "kind": "image|sequence|pairs|video", "id": "..."}
    {"video": "clip.mp4", "kind": "video", "max_frames": 16, "stride": 1, "id": "..."}

Paths are relative to the manifest's folder, or absolute. `pairs` sentences list in-context
examples in order x1, y1, x2, y2, ... A sentence longer than `max_images` (16) is split into
chunks of at most that many images (an even number for pairs); chunk j of sentence `s` is `s#j`.
Malformed lines are returned as skips with their line number and reason, never raised. Every chunk
carries its line's JSON object (`Sentence.fields`): keys this module does not read (a store's "task",
"category", "derive") reach whoever reads the sentences.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lvm.data.offline.sources import Skip
from lvm.data.offline.units import Unit, read_lines
from lvm.data.shards.format import KINDS

DEFAULT_MAX_IMAGES = 16


@dataclass(frozen=True)
class Sentence:
    id: str
    kind: str
    images: tuple[str, ...] = ()        # absolute paths of still images, in order
    video: str | None = None            # absolute path of a video (or animated GIF)
    max_frames: int = DEFAULT_MAX_IMAGES
    stride: int = 1
    frame_offset: int = 0               # first sampled frame of this chunk (long videos)
    line: int = 0
    fields: dict = field(default_factory=dict, compare=False, repr=False)  # the line's JSON object, as written

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.video,) if self.video else self.images


@dataclass
class Manifest:
    path: Path
    sentences: list[Sentence] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


def _resolve(root: Path, p) -> str:
    if not isinstance(p, str) or not p:
        raise ValueError(f"path must be a non-empty string, got {p!r}")
    q = Path(p)
    return str(q if q.is_absolute() else (root / q))


def _positive_int(entry: dict, key: str, default: int) -> int:
    v = entry.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"'{key}' must be a positive integer, got {v!r}")
    return v


def parse_line(entry, root: Path, line: int, max_images: int) -> list[Sentence]:
    """One decoded JSON value -> its sentence chunks; raises ValueError with the reason."""
    if not isinstance(entry, dict):
        raise ValueError("line is not a JSON object")
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ValueError(f"'kind' must be one of {list(KINDS)}, got {kind!r}")
    sid = entry.get("id", f"line{line}")
    if not isinstance(sid, str) or not sid:
        raise ValueError(f"'id' must be a non-empty string, got {sid!r}")
    fields = entry
    if ("images" in entry) == ("video" in entry):
        raise ValueError("a line needs exactly one of 'images' or 'video'")
    if "video" in entry:
        if kind != "video":
            raise ValueError(f"a 'video' entry must have kind 'video', got {kind!r}")
        video = _resolve(root, entry["video"])
        max_frames = _positive_int(entry, "max_frames", max_images)
        stride = _positive_int(entry, "stride", 1)
        starts = range(0, max_frames, max_images)
        return [Sentence(id=sid if len(starts) == 1 else f"{sid}#{j}", kind=kind, video=video,
                         max_frames=min(max_images, max_frames - s), stride=stride, frame_offset=s, line=line,
                         fields=fields)
                for j, s in enumerate(starts)]
    images = entry["images"]
    if not isinstance(images, list) or not images:
        raise ValueError("'images' must be a non-empty list of paths")
    paths = [_resolve(root, p) for p in images]
    if kind == "pairs" and len(paths) % 2:
        raise ValueError(f"a 'pairs' sentence needs an even number of images (x1, y1, ...), got {len(paths)}")
    if kind == "image" and len(paths) != 1:
        raise ValueError(f"an 'image' sentence holds exactly one image, got {len(paths)}; use 'sequence'")
    step = max_images - (max_images % 2 if kind == "pairs" else 0)
    chunks = [paths[s : s + step] for s in range(0, len(paths), step)]
    return [Sentence(id=sid if len(chunks) == 1 else f"{sid}#{j}", kind=kind, images=tuple(c), line=line,
                     fields=fields)
            for j, c in enumerate(chunks)]


def iter_manifest_lines(lines, path: Path, max_images: int = DEFAULT_MAX_IMAGES):
    """For each (line number in the file, byte offset, raw bytes): the line's chunks (a list of
    Sentences) or a Skip. A line without an 'id' is `line<N>` by its number in the file (in every part of a
    large manifest, `lvm.data.offline.units.read_lines`), and a bad line is reported as `path:N`. Ids must be unique within what is read together (a manifest, or one part
    of a large one); memory is that set of ids, never the sentences."""
    if max_images < 2:
        raise ValueError("max_images must be at least 2")
    root = path.parent.resolve()
    seen: set[str] = set()
    for n, offset, raw in lines:
        text = raw.strip()
        if not text:
            continue
        if n is None:
            raise ValueError(f"{path}: manifest line at byte {offset} has no line number")
        where = f"{path}:{n}"
        try:
            entry = json.loads(text.decode("utf-8"))
            sentences = parse_line(entry, root, n, max_images)
        except (ValueError, UnicodeDecodeError) as e:
            yield Skip(source=where, reason=f"malformed manifest line: {e}", line=n)
            continue
        base = sentences[0].id.split("#")[0]
        if base in seen:
            yield Skip(source=where, reason=f"duplicate id {sentences[0].id!r}", line=n)
            continue
        seen.add(base)
        yield sentences


def unit_sentences(unit: Unit, max_images: int = DEFAULT_MAX_IMAGES):
    """The source of a manifest unit (a file, or a part of a large one): per line its chunks or a Skip."""
    if not unit.exists:
        yield Skip(source=unit.path, reason="file not found")
        return
    yield from iter_manifest_lines(read_lines(unit), Path(unit.path), max_images)


def read_manifest(path: str | Path, max_images: int = DEFAULT_MAX_IMAGES) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found")
    out = Manifest(path)
    with path.open("rb") as f:
        for item in iter_manifest_lines(((n, None, raw) for n, raw in enumerate(f, start=1)), path, max_images):
            if isinstance(item, Skip):
                out.skipped.append(item)
            else:
                out.sentences.extend(item)
    return out


def write_manifest(entries: list[dict], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for e in entries:
            f.write(json.dumps(e, sort_keys=True) + "\n")
    tmp.replace(path)


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
VIDEO_EXTS = {".mp4", ".webm", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".gif"}


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def _files(folder: Path, exts: set[str]) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts), key=lambda p: (str(p.parent), _natural_key(p)))


def manifest_from_tree(root: str | Path, pairs_per_sentence: int = 8, max_frames: int = DEFAULT_MAX_IMAGES,
                       stride: int = 1) -> list[dict]:
    """Manifest entries from an ordinary folder tree, paths relative to `root`:

    - `images/**`            every image is a single-image sentence;
    - `videos/**`            every video (mp4, webm, avi, gif, ...) is a video sentence;
    - `sequences/<name>/`    every folder of images is one sequence (files in natural order);
    - `pairs/<task>/input/` + `pairs/<task>/label/`: files matched by stem become in-context
      sentences of `pairs_per_sentence` (x, y) pairs, in sorted stem order.
    Image files lying directly in `root` count as single images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder {root} not found")
    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    entries: list[dict] = []
    for p in sorted((q for q in root.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTS), key=_natural_key):
        entries.append({"id": f"image/{p.stem}", "kind": "image", "images": [rel(p)]})
    if (root / "images").is_dir():
        for p in _files(root / "images", IMAGE_EXTS):
            entries.append({"id": f"image/{rel(p)}", "kind": "image", "images": [rel(p)]})
    if (root / "videos").is_dir():
        for p in _files(root / "videos", VIDEO_EXTS):
            entries.append({"id": f"video/{rel(p)}", "kind": "video", "video": rel(p), "max_frames": max_frames, "stride": stride})
    if (root / "sequences").is_dir():
        for d in sorted((q for q in (root / "sequences").rglob("*") if q.is_dir()), key=str):
            frames = sorted((p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS), key=_natural_key)
            if frames:
                entries.append({"id": f"sequence/{rel(d)}", "kind": "sequence", "images": [rel(p) for p in frames]})
    if (root / "pairs").is_dir():
        for task in sorted(q for q in (root / "pairs").iterdir() if q.is_dir()):
            inputs = {p.stem: p for p in _files(task / "input", IMAGE_EXTS)} if (task / "input").is_dir() else {}
            labels = {p.stem: p for p in _files(task / "label", IMAGE_EXTS)} if (task / "label").is_dir() else {}
            stems = sorted(inputs.keys() & labels.keys(), key=lambda s: _natural_key(Path(s)))
            for k in range(0, len(stems), pairs_per_sentence):
                group = stems[k : k + pairs_per_sentence]
                images = [rel(x) for s in group for x in (inputs[s], labels[s])]
                entries.append({"id": f"pairs/{task.name}/{k // pairs_per_sentence}", "kind": "pairs", "images": images})
    return entries
