"""Optional speed-ups of a built LlamaForCausalLM: Liger-Kernel's fused kernels and torch.compile.

Each is asked for by a flag (`--kernels liger`, `--compile`) and each, when it cannot run here, leaves the
model as it was and returns one line saying why (the trainer logs it); nothing is half applied.

- `--kernels liger` (needs the liger-kernel package, Triton and a CUDA device): Liger's RMSNorm, SwiGLU MLP
  and RoPE Triton kernels patched into this model instance, and its fused linear cross-entropy (the output
  head and the loss computed chunk by chunk, never materialising the b x s x vocab logits) unless the caller
  needs the logits of a training forward (a mixture's per-source loss reads them) or the model is partitioned by
  ZeRO-3 (the fused loss reads the output weight outside the head's forward, where ZeRO-3 never gathers it).
- `--compile`: `torch.compile` of every decoder layer (one graph serves all layers; PyTorch inlines the
  modules, so their parameters are inputs, not constants). The whole model is not compiled: the loss, the
  embedding and DeepSpeed's hooks stay eager. Not under ZeRO-3, whose parameter gathering hooks fire inside
  each layer. `torch._dynamo.config.suppress_errors` is set, so a layer that fails to compile runs eagerly.
"""

from __future__ import annotations

import importlib.util

import torch

KERNEL_CHOICES = ("none", "liger")


def liger_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return "the liger-kernel package is not installed"
    if device.type != "cuda":
        return f"its Triton kernels need a CUDA device (this run is on {device.type})"
    return None


def apply_kernels(model, choice: str, device: torch.device, need_logits: bool = False) -> str:
    """Patch `model` with the fused kernels of `choice`; returns the one line to log."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"--kernels {choice!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    if choice == "none":
        return "kernels: transformers' own modules"
    why = liger_unavailable(device)
    if why is not None:
        return f"--kernels liger: {why}; using transformers' own modules"
    no_flce = fused_loss_unavailable(model, need_logits)
    flce = no_flce is None
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=flce, model=model)
    except Exception as e:  # a liger release that does not know this transformers version, say
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"--kernels liger: liger-kernel could not patch this model ({type(e).__name__}: {first}); using transformers' own modules"
    head = "fused linear cross-entropy" if flce else f"the plain output head and loss ({no_flce})"
    return f"kernels: Liger RMSNorm, SwiGLU, RoPE and {head}"


def zero3_partitioned(model) -> bool:
    """Whether `model` was built inside deepspeed.zero.Init (its parameters carry ZeRO-3's partitioning state)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def fused_loss_unavailable(model, need_logits: bool) -> str | None:
    """Why Liger's fused linear cross-entropy cannot replace the output head and loss of `model`, or None.

    Under ZeRO-3 it cannot: the fused loss reads `lm_head.weight` directly instead of calling the head module,
    and ZeRO-3 gathers a partitioned parameter only around its own module's forward, so the kernel would get
    the empty local shard (a size mismatch at the first step; trl issues #3368, #5891)."""
    if need_logits:
        return "the per-source loss needs the logits"
    if zero3_partitioned(model):
        return "under ZeRO-3 the fused loss would read lm_head.weight ungathered"
    return None


def compile_unavailable(zero_stage: int) -> str | None:
    if not hasattr(torch, "compile"):
        return f"this PyTorch ({torch.__version__}) has no torch.compile"
    if zero_stage == 3:
        return "ZeRO-3 gathers parameters with hooks inside every layer, which torch.compile does not trace"
    return None


def compile_layers(model, zero_stage: int) -> str:
    """torch.compile every decoder layer of `model` in place; returns the one line to log."""
    why = compile_unavailable(zero_stage)
    if why is not None:
        return f"--compile: {why}; running eagerly"
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a layer that fails to compile runs eagerly
    for layer in model.model.layers:
        layer.compile()
    return f"compile: {len(model.model.layers)} decoder layers compiled with torch.compile (the first steps include compilation)"
