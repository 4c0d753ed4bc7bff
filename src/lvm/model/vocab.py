"""The one definition of the token-id layout shared by shards, training and generation.

| ids            | meaning                                                     |
|----------------|-------------------------------------------------------------|
| 0 .. 8191      | visual codes (codebook index)                               |
| 8192           | [BOS]                                                       |
| 8193           | [EOS]                                                       |
| 8194           | [PAD] (never a loss target)                                 |
| 8195 .. 8255   | unused rows: the embedding is padded to a multiple of 64    |

Visual codes need 13 bits, so tokens are stored on disk as uint16 (512 bytes per image).
A visual sentence of n codes is framed as `[BOS] codes [EOS]` (n + 2 tokens) by `frame`, the one place that
does it: training windows, evaluation and generation prompts all call it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CODEBOOK_SIZE = 8192
IMAGE_SIZE = 256
TOKENS_PER_IMAGE = 256  # a 16x16 grid at downsampling factor 16
BOS_ID = CODEBOOK_SIZE
EOS_ID = CODEBOOK_SIZE + 1
PAD_ID = CODEBOOK_SIZE + 2
N_SPECIAL = 3
VOCAB_MULTIPLE = 64
IGNORE_INDEX = -100  # label value that the loss skips (transformers' convention)


def padded_vocab_size(codebook_size: int = CODEBOOK_SIZE, multiple: int = VOCAB_MULTIPLE) -> int:
    """Rows of the embedding: codes + specials, rounded up to `multiple` for fast matmuls."""
    n = codebook_size + N_SPECIAL
    return (n + multiple - 1) // multiple * multiple


VOCAB_SIZE = padded_vocab_size()  # 8256


def frame(codes: np.ndarray | Callable[[int, int], np.ndarray], begin: int = 0, end: int | None = None, *,
          n: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Tokens [begin, end) of the visual sentence `[BOS] codes [EOS]` (n + 2 tokens for n codes; an `end` past
    that is cut to it).

    `codes` is the sentence's codes, or a function read(lo, hi) giving codes[lo:hi] of a sentence of `n` codes,
    so that a caller reading from storage reads only the codes inside the span (training windows do). A prompt
    is a sentence that goes on: `frame(codes, end=len(codes) + 1)` is `[BOS] codes`, without EOS. The tokens go
    into `out` (end - begin long) when given, else into a new int64 array, which is returned."""
    if callable(codes):
        if n is None:
            raise ValueError("frame: a read function needs the sentence's length n")
        read = codes
    else:
        n = len(codes)
        seq = codes

        def read(lo: int, hi: int) -> np.ndarray:
            return seq[lo:hi]
    end = n + 2 if end is None else min(end, n + 2)
    take = max(0, end - begin)
    if out is None:
        out = np.empty(take, np.int64)
    if take == 0:
        return out
    if begin == 0:
        out[0] = BOS_ID
    lo, hi = max(begin, 1), min(end, n + 1)  # the codes' span, in sentence positions
    if hi > lo:
        out[lo - begin : hi - begin] = read(lo - 1, hi - 1)
    if end == n + 2:
        out[take - 1] = EOS_ID
    return out
