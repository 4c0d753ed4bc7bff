"""Model presets (LVM's released configs) and the one function that builds a LlamaConfig.

hidden / intermediate / layers / heads; RMSNorm eps 1e-6; untied embeddings; max positions =
the training sequence length; vocabulary per `lvm.model.vocab` (8256 rows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lvm.model.vocab import BOS_ID, CODEBOOK_SIZE, EOS_ID, N_SPECIAL, PAD_ID, VOCAB_SIZE

PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 176, 2, 4),        # CPU tests
    "demo": (64, 176, 2, 1),        # make demo: learns the frame-to-frame copy on 2 CPU cores (docs/learning.md)
    "100m": (640, 1664, 22, 10),
    "300m": (1024, 2688, 22, 8),
    "600m": (1536, 4096, 22, 16),
    "1b": (2048, 5504, 22, 16),
    "3b": (3200, 8640, 26, 32),
    "7b": (4096, 11008, 32, 32),
}
# LlamaConfig fields a preset sets beyond its shape. LVM's models are untied with transformers' initialisation
# (std 0.02). The demo's output head is its input embedding: with 8,256 rows and a few hundred thousand training
# tokens an untied head must learn each code's output row separately (each code is seen a few dozen times), while a
# tied one copies a code as soon as one attention head moves it. Its weights start at std 0.1 (~1/sqrt(hidden 64)):
# at 0.02 a model this narrow sits on the unigram plateau for hundreds of steps (measured in docs/learning.md).
PRESET_FIELDS: dict[str, dict] = {"demo": {"tie_word_embeddings": True, "initializer_range": 0.1}}
DEFAULT_SEQ_LEN = 4096

if TYPE_CHECKING:
    from transformers import LlamaConfig


@dataclass(frozen=True)
class ModelShape:
    """The numbers that size a LlamaForCausalLM; no torch or transformers import needed."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = VOCAB_SIZE
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    head_dim: int | None = None


def _config_dict(model: str) -> dict:
    """The LlamaConfig fields of a preset or a JSON file, validated; raises ValueError."""
    if model in PRESETS:
        h, i, n_layers, n_heads = PRESETS[model]
        return {"hidden_size": h, "intermediate_size": i, "num_hidden_layers": n_layers,
                "num_attention_heads": n_heads, "num_key_value_heads": n_heads, "vocab_size": VOCAB_SIZE,
                "tie_word_embeddings": False, **PRESET_FIELDS.get(model, {})}
    if not Path(model).is_file():
        raise ValueError(f"--model {model!r}: neither a preset ({', '.join(PRESETS)}) nor a config file")
    try:
        d = json.loads(Path(model).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--model {model}: not a LlamaConfig JSON ({e})") from None
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    if not isinstance(d, dict) or any(not isinstance(d.get(k), int) for k in need):
        raise ValueError(f"--model {model}: a LlamaConfig JSON needs integer {', '.join(need)}")
    d.setdefault("vocab_size", VOCAB_SIZE)
    if d["vocab_size"] < CODEBOOK_SIZE + N_SPECIAL:
        raise ValueError(f"--model {model}: vocab_size {d['vocab_size']} < {CODEBOOK_SIZE + N_SPECIAL} (codes + BOS/EOS/PAD)")
    return d


def model_shape(model: str) -> ModelShape:
    d = _config_dict(model)
    return ModelShape(d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"], d["num_attention_heads"],
                      d.get("num_key_value_heads") or d["num_attention_heads"], d["vocab_size"],
                      bool(d.get("tie_word_embeddings", False)),
                      bool(d.get("attention_bias", False)), bool(d.get("mlp_bias", False)), d.get("head_dim"))


def attention_implementation(requested: str = "auto", device=None, dtype=None) -> str:
    """The attention implementation to build a model with (`lvm.model.attention.resolve_attention`):
    flash_attention_2 where it can run, else PyTorch SDPA. Without a device: this machine's first GPU in
    bf16, or the CPU."""
    import torch

    from lvm.model.attention import resolve_attention

    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return resolve_attention(requested, torch.device(device), dtype)[0]


def llama_config(model: str, seq_len: int = DEFAULT_SEQ_LEN) -> LlamaConfig:
    """A preset name or a path to a LlamaConfig JSON -> the config this pipeline trains."""
    from transformers import LlamaConfig

    try:
        d = _config_dict(model)
        cfg = LlamaConfig.from_dict(d)
    except ValueError:
        raise
    except Exception as e:  # transformers' strict field validation has its own error types
        raise ValueError(f"--model {model}: invalid LlamaConfig: {str(e).splitlines()[0]} {str(e).splitlines()[-1]}") from None
    cfg.max_position_embeddings = seq_len
    cfg.rms_norm_eps = 1e-6
    cfg.tie_word_embeddings = bool(d.get("tie_word_embeddings", False))
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    cfg.use_cache = False
    return cfg


def count_parameters(cfg) -> int:
    """Exact parameter count of LlamaForCausalLM for `cfg`, from the config alone."""
    h, i, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    attn = h * cfg.num_attention_heads * head_dim * 2 + h * kv * head_dim * 2
    if getattr(cfg, "attention_bias", False):
        attn += cfg.num_attention_heads * head_dim + 2 * kv * head_dim + h
    mlp = 3 * h * i + (2 * i + h if getattr(cfg, "mlp_bias", False) else 0)
    per_layer = attn + mlp + 2 * h
    embed = v * h * (1 if cfg.tie_word_embeddings else 2)
    return n * per_layer + embed + h


def matmul_parameters(cfg) -> int:
    """Parameters that take part in a matrix product per token: all but the input embedding, which is a
    lookup (with tied embeddings the one matrix is also the output head, a product, and counts)."""
    n = count_parameters(cfg)
    return n if cfg.tie_word_embeddings else n - cfg.vocab_size * cfg.hidden_size


def attention_width(cfg) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_attention_heads * head_dim


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token of a window whose tokens all attend over `seq_len` (PaLM's convention,
    forward + backward): 6 x matrix-product parameters (the input embedding left out) + 12 x layers x
    attention width x seq_len (scores and the weighted sum). See `lvm.train.metrics.window_flops` for
    packed windows, where each token attends over its own sentence only and PAD is no work."""
    return 6 * matmul_parameters(cfg) + 12 * cfg.num_hidden_layers * attention_width(cfg) * seq_len
