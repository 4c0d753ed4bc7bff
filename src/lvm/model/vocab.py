"""The one definition of the token-id layout shared by shards, training and generation.

| ids            | meaning                                                     |
|----------------|-------------------------------------------------------------|
| 0 .. 8191      | visual codes (codebook index)                               |
| 8192           | [BOS]                                                       |
| 8193           | [EOS]                                                       |
| 8194           | [PAD] (never a loss target)                                 |
| 8195 .. 8255   | unused rows: the embedding is padded to a multiple of 64    |

Visual codes need 13 bits, so tokens are stored on disk as uint16 (512 bytes per image).
"""

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
