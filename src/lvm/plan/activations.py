"""Bytes saved for backward by one forward of LlamaForCausalLM, the attention mask of packed windows, and the
backward's peak on top of them (`lvm.plan.memory` adds model states and buffers).

Activations saved for backward, per token, for HF's LlamaDecoderLayer with SDPA/flash attention
(no s^2 scores are stored; the kernel keeps a per-head fp32 logsumexp) and RMSNorm computed in fp32
(d = bytes of the compute dtype, h hidden, i intermediate, a heads):
  one layer, no checkpointing      (8h + 4i) d + 8h + 4a + 8
      16-bit tensors: layer input, two RMSNorm outputs, q, k (after RoPE), v, attention output and
      o_proj input (8h); gate, up, SiLU(gate), gate*up (4i); fp32: two RMSNorm input copies (8h),
      logsumexp (4a), two rms statistics (8).
  one layer, checkpointed          h d (only the layer input; the layer is recomputed in backward)
  RoPE cos/sin (shared)             2 (h/a) d / micro_batch   (not saved when checkpointing)
  head                              4V + 4h + 2hd + 20: fp32 log-softmax over the padded vocabulary
      V (b s V x 4 B, which dominates small models), final RMSNorm fp32 copy and output, ids/labels.
  These are checked against `torch.autograd.graph.saved_tensors_hooks` on CPU in fp32 and bf16
  (tests/plan/test_memory.py keeps them within 10%).

Two GPU terms DeepSpeed's estimators leave out:
  * Attention mask of `--packing sentence` on the SDPA path. A packed window needs a block-causal mask;
    the trainer builds one additive b x 1 x s x s mask in the compute dtype per micro-batch and shares it
    by every layer (`lvm.model.attention.block_causal_mask`): b s^2 d bytes, alive from forward to
    backward and saved (as the same storage) by each layer's SDPA kernel, which cannot take the flash
    kernel with a mask. Left to transformers, restarting position ids would give a boolean mask
    (masking_utils.py `find_packed_sequence_indices`, for one-row batches only) that PyTorch converts to a
    new additive tensor in every layer (`convert_boolean_attn_mask`, aten/.../transformers/attention.cpp):
    b s^2 d per layer; the memory-efficient kernel also pads a copy per layer when s is not a multiple of
    16 (`preprocess_mask`), modelled here. RoPE cos/sin become per sequence (2 (h/a) d per token, no longer
    shared over the batch). flash_attention_2 takes the varlen path (cu_seqlens): no mask at all.
    Measured on CPU (tests/plan/test_memory.py).
  * Recompute peak of a checkpointed layer: in backward the layer's activations are recomputed all
    at once and its backward adds the MLP's gate/up gradients (2 i d per token); by then the head's
    saved tensors are freed. The head's own backward peak is the two fp32 gradients of the loss
    w.r.t. log-softmax and logits (8 B per logit). The peak is the larger of the two phases
    (measured with torch.distributed._tools.mem_tracker.MemTracker on CPU, tests/plan/test_memory.py).
"""

from __future__ import annotations

from lvm.plan.setting import DTYPE_BYTES, head_dim


def layer_bytes_per_token(cfg, d: int) -> int:
    h, i, a = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    return (8 * h + 4 * i) * d + 8 * h + 4 * a + 8


def mask_bytes(micro_batch: int, seq_len: int, d: int, n_layers: int) -> int:
    """The additive block-causal mask the trainer shares by all layers, plus the kernel's padded copies
    per layer when seq_len is not a multiple of 16 (memory-efficient attention's alignment)."""
    shared = micro_batch * seq_len * seq_len * d
    if seq_len % 16:
        shared += n_layers * micro_batch * seq_len * (-(-seq_len // 16) * 16) * d
    return shared


def head_bytes_per_token(cfg, d: int) -> int:
    h = cfg.hidden_size
    return 4 * cfg.vocab_size + 4 * h + 2 * h * d + 20


def activation_bytes(cfg, micro_batch: int, seq_len: int, grad_ckpt: bool, dtype: str = "bf16", attn_mask: bool = False) -> int:
    """Bytes saved for backward by one forward pass of LlamaForCausalLM (with the loss)."""
    d = DTYPE_BYTES[dtype]
    h, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    tokens = micro_batch * seq_len
    head = head_bytes_per_token(cfg, d)
    if grad_ckpt:
        total = (n_layers * h * d + head) * tokens
    else:
        rope = 2 * head_dim(cfg) * d / (1 if attn_mask else micro_batch)
        total = (n_layers * layer_bytes_per_token(cfg, d) + head + rope) * tokens
    if attn_mask:
        total += mask_bytes(micro_batch, seq_len, d, 0 if grad_ckpt else n_layers)
    return int(total)


def backward_peak_bytes(cfg, micro_batch: int, seq_len: int, grad_ckpt: bool, dtype: str = "bf16", attn_mask: bool = False) -> int:
    """Bytes live at the backward peak on top of the saved activations: the larger of the head's phase
    and a layer's (recomputed when checkpointing), see the module docstring."""
    d = DTYPE_BYTES[dtype]
    tokens = micro_batch * seq_len
    head_phase = tokens * cfg.vocab_size * 8
    layer_phase = tokens * 2 * cfg.intermediate_size * d - tokens * head_bytes_per_token(cfg, d)
    if grad_ckpt:
        layer_phase += tokens * layer_bytes_per_token(cfg, d)
        if attn_mask and seq_len % 16:
            layer_phase += mask_bytes(micro_batch, seq_len, d, 1) - micro_batch * seq_len * seq_len * d
    return int(max(head_phase, layer_phase))
