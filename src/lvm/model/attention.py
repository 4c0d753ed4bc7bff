"""Which attention kernel a model runs, and how packed windows keep their sentences apart.

Implementations (`--attention`):
- `flash_attention_2`: the flash-attn package's kernels (CUDA, bf16/fp16, compute capability >= 8.0).
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient / cuDNN kernels on
  GPU, a C++ kernel on CPU).
- `eager`: transformers' reference implementation (matmul + softmax); for checks only.
- `auto` (default): flash_attention_2 where it can run, else sdpa. A requested implementation that cannot
  run here falls back to sdpa with one log line that says why.

Packed windows (`--packing sentence`). A window holds several sentences, `position_ids` restarting at 0 at
each one (and at the PAD tail). A token must attend only to earlier tokens of its own sentence. Nothing
is left to transformers' guess from `position_ids` (it detects packing for flash-attention only when the
batch has one row, so rows of a micro-batch > 1 would attend across sentences); the trainer passes the
packing explicitly, built here from `position_ids`:
- flash_attention_2: the varlen path. The micro-batch is flattened to one stream of B*L tokens and every
  segment (sentence, or the PAD tail) is one sequence of `flash_attn_varlen_func`: `cu_seq_lens_q/k` are
  the cumulative segment lengths over the flattened stream (int32, B*L at the end), `max_length_q/k` the
  window length (an upper bound the kernel accepts; a constant, so nothing syncs with the host and
  torch.compile sees one value). transformers' `_flash_attention_forward` takes that path whenever the four
  keyword arguments are given and there is no 2D attention mask.
- sdpa / eager: one additive block-diagonal causal mask [B, 1, L, L] in the compute dtype (0 inside a
  segment at or before the query, the dtype's minimum elsewhere), built once per micro-batch on the device
  and shared by every layer (a boolean mask would be converted to a new float tensor in every layer).
  transformers uses a 4D mask as given.
`tests/model/test_attention.py` checks both on CPU: no attention across sentences in any row of a
micro-batch of 3, and the logits of a packed row equal those of each sentence run alone.
"""

from __future__ import annotations

import importlib.util

import torch

ATTENTION_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")


def flash_attn_import_error() -> str | None:
    """Why the functions transformers calls cannot be imported from an installed flash-attn, or None. A wheel built
    against another torch (or CUDA) installs fine and fails here ("undefined symbol" from flash_attn_2_cuda), which
    transformers would only meet at the first forward pass."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401
    except Exception as e:  # ImportError, OSError from the CUDA extension
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return f"{type(e).__name__}: {first}" if first else type(e).__name__
    return None


def flash_attn_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why flash_attention_2 cannot run here, or None when it can."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed"
    err = flash_attn_import_error()
    if err is not None:
        return f"the installed flash-attn cannot be imported ({err})"
    if device.type != "cuda":
        return f"it needs a CUDA device (this run is on {device.type})"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"it needs bf16 or fp16 (this run computes in {str(dtype).removeprefix('torch.')})"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"it needs compute capability >= 8.0 ({torch.cuda.get_device_name(device)} has {major}.x)"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():  # the check transformers makes before building a flash_attention_2 model
        version = getattr(importlib.import_module("flash_attn"), "__version__", "?")
        return f"transformers does not accept this flash-attn ({version}; it takes the flash-attn 2 package, >= 2.3.3)"
    return None


def resolve_attention(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str | None]:
    """(implementation to build the model with, one-line note when `requested` could not be honoured)."""
    if requested not in ATTENTION_CHOICES:
        raise ValueError(f"--attention {requested!r}: choose one of {', '.join(ATTENTION_CHOICES)}")
    if requested in ("sdpa", "eager"):
        return requested, None
    why = flash_attn_unavailable(device, dtype)
    if why is None:
        return "flash_attention_2", None
    if requested == "auto":
        return "sdpa", None
    return "sdpa", f"--attention flash_attention_2: {why}; using sdpa"


def segment_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, L]: True where a segment starts (position id 0, and the first token of every row)."""
    starts = position_ids == 0
    starts[:, 0] = True
    return starts


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] int: the index of each token's segment within its row (0, 0, 0, 1, 1, 2, ...)."""
    return segment_starts(position_ids).long().cumsum(-1) - 1


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """flash-attention varlen arguments for the micro-batch flattened to B*L tokens (see the module doc)."""
    b, L = position_ids.shape
    starts = segment_starts(position_ids).reshape(-1).nonzero().reshape(-1)
    cu = torch.cat([starts, torch.tensor([b * L], device=position_ids.device)]).to(torch.int32)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": L, "max_length_k": L}


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: 0 where query i may attend key j (same segment, j <= i), else dtype min."""
    seg = segment_ids(position_ids)
    L = seg.shape[1]
    idx = torch.arange(L, device=seg.device)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (idx[None, :, None] >= idx[None, None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def packed_attention_kwargs(position_ids: torch.Tensor | None, implementation: str, dtype: torch.dtype) -> dict:
    """Keyword arguments that keep the segments of packed windows apart under `implementation`
    ({} for unpacked windows: plain causal attention over the whole window)."""
    if position_ids is None:
        return {}
    if implementation == "flash_attention_2":
        return varlen_kwargs(position_ids)
    return {"attention_mask": block_causal_mask(position_ids, dtype)}

