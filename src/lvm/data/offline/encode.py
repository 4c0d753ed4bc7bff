"""Frames -> visual codes: the device a rank encodes on, the tokenizer's geometry check, the encoder.

Each rank encodes on its own device (`cuda:LOCAL_RANK` modulo the visible GPUs; the CPU without one). A GPU
gets the frames through pinned memory as channels_last (the NHWC frames permuted, no copy). `encode_images`
is the one place frames become codes: the sentence shards (`encode_rows`) and anything else that tokenizes
decoded images call it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

from lvm.data.offline.sources.manifest import Sentence
from lvm.model.vocab import CODEBOOK_SIZE, IMAGE_SIZE, TOKENS_PER_IMAGE


def encode_device(cfg):
    """The device this rank encodes on: cfg.device (--device), else its own GPU, else the CPU. A GPU becomes the
    rank's current device too, for anything that allocates on "cuda"."""
    import torch

    from lvm.launch_env import launch_env, local_device

    device = torch.device(cfg.device) if cfg.device else local_device(launch_env())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def check_geometry(tok) -> None:
    """SystemExit unless the tokenizer makes this pipeline's codes (256 of 8192 per 256 px image)."""
    if tok.codebook_size != CODEBOOK_SIZE or tok.image_size != IMAGE_SIZE or tok.tokens_per_image != TOKENS_PER_IMAGE:
        raise SystemExit(f"error: tokenizer {tok.spec} makes {tok.tokens_per_image} codes of {tok.codebook_size} "
                         f"per {tok.image_size}px image; this pipeline needs {TOKENS_PER_IMAGE} of {CODEBOOK_SIZE} "
                         f"at {IMAGE_SIZE}px")


def encode_images(tok, frames: np.ndarray, device, batch_size: int) -> np.ndarray:
    """uint8 frames [n, 256, 256, 3] -> uint16 codes [n, 256], in batches of `batch_size` on `device`."""
    import torch

    out = []
    for s in range(0, len(frames), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(frames[s : s + batch_size]))
        if device.type == "cuda":
            x = x.pin_memory().to(device, non_blocking=True)
        pixels = x.permute(0, 3, 1, 2).float().div_(255.0)
        out.append(tok.encode(pixels).cpu())
    return torch.cat(out).numpy().astype(np.uint16)


class Encoder:
    """`encode_images` with the tokenizer, device and batch size of a run bound: frames -> codes."""

    def __init__(self, tok, device, batch_size: int):
        self.tok, self.device, self.batch_size = tok, device, batch_size

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return encode_images(self.tok, frames, self.device, self.batch_size)


@contextmanager
def beside_decoders(device, pool, workers: int):
    """While decode workers (a pool of `workers`) have their cores, a CPU encoder takes the rest: more intra-op
    threads here would only oversubscribe them."""
    if device is None or device.type != "cpu" or pool is None:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def encode_rows(encode, decoded: list[tuple[Sentence, np.ndarray]]) -> list[dict]:
    """Decoded sentences -> shard rows (tokens, n_images, kind, id), encoded in one call."""
    if not decoded:
        return []
    codes = encode(np.concatenate([f for _, f in decoded]))
    rows, at = [], 0
    for s, f in decoded:
        rows.append({"tokens": codes[at : at + len(f)].reshape(-1), "n_images": len(f), "kind": s.kind, "id": s.id})
        at += len(f)
    return rows


__all__ = ["encode_device", "check_geometry", "encode_images", "Encoder", "beside_decoders", "encode_rows"]
