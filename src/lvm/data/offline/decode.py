"""Decode a visual sentence's sources into preprocessed frames (uint8 [n, 256, 256, 3]).

Still images go through `lvm.tokenizer.preprocess.load_image`. Videos are decoded with PyAV
(mp4, webm, avi, mkv, ...); animated GIF/WebP with Pillow. A video sentence takes frames
`frame_offset, frame_offset + stride, ...` up to `max_frames`. Any defect raises `SourceError`
naming the offending file: the whole sentence is then dropped by the caller (a video minus a frame
is a different video).

A long video cut into chunks (`id#0`, `id#1`, ...) is decoded once, up to the last frame any chunk
wants, and cut (`decode_chunks`); chunks past the end of a video that yielded frames are dropped
without a report (a clip shorter than `max_frames` is not a defect).

`decode_task` is what the decode workers run: a list of manifest lines (their chunks) or of
webdataset samples (image bytes), each turned into frames or a `(source, reason)` pair. `decoded_stream`
runs a unit's source through them: a process pool, results in input order, a bounded number of tasks in
flight, so memory does not grow with the unit.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from pathlib import Path

import numpy as np
from PIL import ImageSequence

from lvm.data.offline.sources import Skip
from lvm.data.offline.sources.manifest import Sentence, unit_sentences
from lvm.data.offline.sources.webdataset import Sample, iter_samples
from lvm.data.offline.units import Unit
from lvm.model.vocab import IMAGE_SIZE
from lvm.tokenizer.preprocess import SourceError, load_image, open_image, prepare_image

PILLOW_VIDEO_EXTS = {".gif", ".webp", ".apng"}
LINES_PER_TASK = 4      # manifest lines per decode task
SAMPLES_PER_TASK = 16   # webdataset samples per decode task


class SentenceError(Exception):
    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


def _wanted(sentence: Sentence) -> range:
    first = sentence.frame_offset * sentence.stride
    return range(first, first + sentence.max_frames * sentence.stride, sentence.stride)


def _video_frames_pillow(path: str, wanted: set[int], stop: int, resize: str) -> dict[int, np.ndarray]:
    img = open_image(path)
    frames = {}
    for i, frame in enumerate(ImageSequence.Iterator(img)):
        if i >= stop:
            break
        if i in wanted:
            frames[i] = prepare_image(frame.copy(), resize=resize)
    return frames


def _video_frames_av(path: str, wanted: set[int], stop: int, resize: str) -> dict[int, np.ndarray]:
    import av

    frames = {}
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise SourceError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i >= stop:
                    break
                if i in wanted:
                    frames[i] = prepare_image(frame.to_image(), resize=resize)
    except SourceError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise SourceError(f"undecodable video: {e}") from None
    return frames


def decode_chunks(chunks: list[Sentence], resize: str = "squash") -> list[np.ndarray | None]:
    """The chunks of one video line, decoded in one pass: frames per chunk (None: past the end)."""
    path = chunks[0].video
    wanted = [_wanted(c) for c in chunks]
    need = set().union(*(set(w) for w in wanted))
    stop = max(w.stop for w in wanted)
    try:
        if not Path(path).is_file():
            raise SourceError("file not found")
        read = _video_frames_pillow if Path(path).suffix.lower() in PILLOW_VIDEO_EXTS else _video_frames_av
        frames = read(path, need, stop, resize)
        out = []
        for w in wanted:
            got = [frames[i] for i in w if i in frames]
            out.append(np.stack(got) if got else None)
        if out[0] is None:
            raise SourceError(f"video has no frame at or after index {wanted[0].start}")
    except SourceError as e:
        raise SentenceError(path, str(e)) from None
    return out


def decode_sentence(sentence: Sentence, resize: str = "squash") -> np.ndarray:
    """Sentence -> uint8 [n_images, 256, 256, 3]; raises SentenceError(source, reason)."""
    if sentence.video:
        return decode_chunks([sentence], resize)[0]
    out = np.empty((len(sentence.images), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, path in enumerate(sentence.images):
        try:
            out[i] = load_image(path, resize=resize)
        except SourceError as e:
            raise SentenceError(path, str(e)) from None
    return out


def _guarded(fn, source: str):
    try:
        return fn()
    except SentenceError as e:
        return (e.source, e.reason)
    except SourceError as e:
        return (source, str(e))
    except Exception as e:  # a decoder bug on a hostile file must not stop the run
        return (source, f"{type(e).__name__}: {e}")


def try_decode(args: tuple[Sentence, str]):
    """Pool-friendly wrapper: returns frames, or (source, reason) for a bad sentence."""
    sentence, resize = args
    return _guarded(lambda: decode_sentence(sentence, resize), sentence.sources[0] if sentence.sources else sentence.id)


def decode_line(chunks: list[Sentence], resize: str) -> list:
    """Per chunk of one manifest line: frames, None (past a video's end) or (source, reason)."""
    if chunks[0].video:
        res = _guarded(lambda: decode_chunks(chunks, resize), chunks[0].video)
        return [res] * len(chunks) if isinstance(res, tuple) else res
    return [try_decode((c, resize)) for c in chunks]


def decode_task(task: tuple[str, list, str]) -> list:
    """What a decode worker runs: ("lines", [chunks, ...], resize) -> [per-chunk results, ...];
    ("images", [(source, bytes), ...], resize) -> [frames [1, 256, 256, 3] or (source, reason), ...]."""
    what, items, resize = task
    if what == "lines":
        return [decode_line(chunks, resize) for chunks in items]
    return [_guarded(lambda d=data: load_image(d, resize=resize)[None], src) for src, data in items]



# ----------------------------------------------------------------------------------------------
# A unit's source through the decode workers


def decode_pool(workers: int):
    """The decode worker processes (None: decode in this process)."""
    return mp.get_context("forkserver").Pool(workers) if workers else None


def task_batches(items, size: int):
    batch = []
    for it in items:
        batch.append(it)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def ordered_map(pool, fn, tasks, inflight: int):
    """fn over tasks in a process pool, results in order, at most `inflight` tasks pending
    (Pool.imap would read the whole input ahead into memory)."""
    if pool is None:
        yield from map(fn, tasks)
        return
    pending: deque = deque()
    for t in tasks:
        pending.append(pool.apply_async(fn, (t,)))
        if len(pending) >= inflight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def decoded_stream(unit: Unit, cfg, pool):
    """Per sentence of a unit (a tar or a manifest; cfg: workers, resize, max_images), in order:
    (Sentence, frames) or a Skip."""
    inflight = 2 * max(cfg.workers, 1) + 2
    if unit.kind == "tar":
        items, per_task, worker = iter_samples(unit.path, unit.label), SAMPLES_PER_TASK, decode_samples
    else:
        items, per_task, worker = unit_sentences(unit, cfg.max_images), LINES_PER_TASK, decode_lines
    tasks = ((g, cfg.resize) for g in task_batches(items, per_task))
    for group in ordered_map(pool, worker, tasks, inflight):
        yield from group


def decode_samples(args) -> list:
    """Worker: webdataset samples (and Skips passed through) -> (Sentence, frames) or Skip."""
    group, resize = args
    out = []
    todo = [(i, it) for i, it in enumerate(group) if isinstance(it, Sample)]
    results = decode_task(("images", [(it.key, it.image()[1]) for _, it in todo], resize))
    by_index = dict(zip((i for i, _ in todo), results, strict=True))
    for i, it in enumerate(group):
        if isinstance(it, Skip):
            out.append(it)
            continue
        tar = it.tar_path
        sid = it.id
        res = by_index[i]
        if isinstance(res, tuple):
            out.append(Skip(source=tar, key=it.key, sentence=sid, reason=f"{it.image()[0]} member: {res[1]}"))
        else:
            out.append((Sentence(id=sid, kind="image", images=(f"{tar}:{it.key}",)), res))
    return out


def decode_lines(args) -> list:
    """Worker: manifest lines (chunk lists, and Skips passed through) -> (Sentence, frames) or Skip."""
    group, resize = args
    out = []
    for it in group:
        if isinstance(it, Skip):
            out.append(it)
            continue
        for chunk, res in zip(it, decode_task(("lines", [it], resize))[0], strict=True):
            if res is None:
                continue  # past the end of a video
            if isinstance(res, tuple):
                out.append(Skip(source=res[0], reason=res[1], sentence=chunk.id, line=chunk.line or None))
            else:
                out.append((chunk, res))
    return out
