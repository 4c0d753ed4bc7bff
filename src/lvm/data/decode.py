"""Decode a visual sentence's sources into preprocessed frames (uint8 [n, 256, 256, 3]).

Still images go through `lvm.tokenizer.preprocess.load_image`. Videos are decoded with PyAV
(mp4, webm, avi, mkv, ...); animated GIF/WebP with Pillow. A video sentence takes frames
`frame_offset, frame_offset + stride, ...` up to `max_frames`. Any defect raises `SourceError`
naming the offending file: the whole sentence is then dropped by the caller (a video minus a frame
is a different video).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ImageSequence

from lvm.data.manifest import Sentence
from lvm.model.vocab import IMAGE_SIZE
from lvm.tokenizer.preprocess import SourceError, load_image, open_image, prepare_image

PILLOW_VIDEO_EXTS = {".gif", ".webp", ".apng"}


class SentenceError(Exception):
    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


def _wanted(sentence: Sentence) -> range:
    first = sentence.frame_offset * sentence.stride
    return range(first, first + sentence.max_frames * sentence.stride, sentence.stride)


def _video_frames_pillow(path: str, sentence: Sentence, resize: str) -> list[np.ndarray]:
    img = open_image(path)
    wanted, frames = _wanted(sentence), []
    for i, frame in enumerate(ImageSequence.Iterator(img)):
        if i >= wanted.stop:
            break
        if i in wanted:
            frames.append(prepare_image(frame.copy(), resize=resize))
    return frames


def _video_frames_av(path: str, sentence: Sentence, resize: str) -> list[np.ndarray]:
    import av

    wanted, frames = _wanted(sentence), []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise SourceError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i >= wanted.stop:
                    break
                if i in wanted:
                    frames.append(prepare_image(frame.to_image(), resize=resize))
    except SourceError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise SourceError(f"undecodable video: {e}") from None
    return frames


def decode_sentence(sentence: Sentence, resize: str = "squash") -> np.ndarray:
    """Sentence -> uint8 [n_images, 256, 256, 3]; raises SentenceError(source, reason)."""
    if sentence.video:
        path = sentence.video
        try:
            if not Path(path).is_file():
                raise SourceError("file not found")
            if Path(path).suffix.lower() in PILLOW_VIDEO_EXTS:
                frames = _video_frames_pillow(path, sentence, resize)
            else:
                frames = _video_frames_av(path, sentence, resize)
            if not frames:
                raise SourceError(f"video has no frame at or after index {sentence.frame_offset * sentence.stride}")
        except SourceError as e:
            raise SentenceError(path, str(e)) from None
        return np.stack(frames)
    out = np.empty((len(sentence.images), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, path in enumerate(sentence.images):
        try:
            out[i] = load_image(path, resize=resize)
        except SourceError as e:
            raise SentenceError(path, str(e)) from None
    return out


def try_decode(args: tuple[Sentence, str]):
    """Pool-friendly wrapper: returns frames, or (source, reason) for a bad sentence."""
    sentence, resize = args
    try:
        return decode_sentence(sentence, resize)
    except SentenceError as e:
        return (e.source, e.reason)
    except Exception as e:  # a decoder bug on a hostile file must not stop the run
        return (sentence.sources[0] if sentence.sources else sentence.id, f"{type(e).__name__}: {e}")

