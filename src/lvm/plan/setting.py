"""A run's settings as the memory arithmetic sees them (`lvm.plan.memory` sums the bytes; `lvm.plan.model_states`
and `lvm.plan.activations` compute them): ZeRO stage, micro-batch, checkpointing, dtype, offload, buckets, optimizer,
DeepSpeed's ZeRO-3 reuse limits and the allocator's mode, with the two facts that follow from them (fp32 gradient
accumulation, DeepSpeed's BF16_Optimizer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GiB = 2**30
MiB = 2**20
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DS_DEFAULT_LIVE = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters / stage3_max_reuse_distance default


def expandable_segments_from_env(env=None) -> bool:
    env = os.environ if env is None else env
    conf = (env.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + env.get("PYTORCH_ALLOC_CONF", "")).replace(" ", "")
    return "expandable_segments:True" in conf or "expandable_segments:true" in conf


@dataclass(frozen=True)
class Setting:
    zero_stage: int
    micro_batch: int
    grad_ckpt: bool
    dtype: str = "bf16"
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket: int = 200_000_000
    allgather_bucket: int = 200_000_000
    prefetch_bucket: int = 50_000_000
    overlap_comm: bool = True
    optimizer: str = "adamw"
    attn_mask: bool = False  # --packing sentence on the SDPA path (no flash-attention varlen)
    max_live_parameters: int = DS_DEFAULT_LIVE
    max_reuse_distance: int = DS_DEFAULT_LIVE
    persistence_threshold: int = 100_000
    expandable_segments: bool = False
    grad_accum_dtype: str = "auto"  # data_types.grad_accum_dtype; "auto": as training resolves it (fp32 for bf16 under ZeRO)


def fp32_grad_accum(s: Setting) -> bool:
    """Whether DeepSpeed accumulates the gradients of `s` in fp32 beside the bf16 ones: bf16 under ZeRO, unless the
    ds_config names another dtype (stage 0 takes bf16 only; fp32 and fp16 training need no such buffer)."""
    return s.dtype == "bf16" and s.zero_stage >= 1 and s.grad_accum_dtype in ("auto", "fp32")


def bf16_optimizer(s: Setting) -> bool:
    """Whether DeepSpeed runs `s` with its BF16_Optimizer: ZeRO-1, bf16 weights, fp32 accumulation, no offload."""
    return s.zero_stage == 1 and fp32_grad_accum(s) and not s.offload_optimizer


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
