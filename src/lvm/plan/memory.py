"""Where every byte of a LLaMA training step goes, per GPU, from the model config alone.

Model states (DeepSpeed's own accounting, `estimate_zero{2,3}_model_states_mem_needs`, for AdamW):
  bf16/fp16 weights 2 B/param, gradients 2 B (16-bit) + 4 B (fp32 partition), fp32 master 4 B and
  the optimizer's state S: 2 + 2 + 4 + 4 + S B/param at one GPU (AdamW: S = 8, the "16-18 B/param" rule
  plus the fp32 gradient copy DeepSpeed keeps). ZeRO partitions over the data-parallel size dp:
    stage 0  everything replicated
    stage 1  optimizer (master + S) / dp
    stage 2  + gradients (6 B) / dp                     -> 2N + (10 + S)N/dp   (DeepSpeed, stage_1_and_2.py)
    stage 3  + weights (2 B) / dp, plus the largest layer gathered for compute (4 B x its params);
             16-bit gradients are reduce-scattered straight out of the bucket, so only the fp32
             gradient partition stays: 2 + 4 + 4 + S B / dp -> 4L + (10 + S)N/dp (DeepSpeed, stage3.py)
  CPU offload moves the optimizer (and, at stage 3, the weights) to host memory:
    stage 2 + optimizer offload: GPU 2N;  stage 3 + optimizer offload: 4L + 2N/dp;  + params: 4L.
  Pure fp32 training keeps 4 B weights and 4 B gradients; under ZeRO DeepSpeed still clones an fp32
  master partition (4 B / dp, measured), then the state S.
  bf16 under ZeRO accumulates gradients in fp32, as training resolves it (`data_types.grad_accum_dtype`,
  lvm.train.ds_config; the estimators above assume 16-bit accumulation, `grad_accum_dtype="bf16"` here):
    stage 1  DeepSpeed's BF16_Optimizer (engine `_do_optimizer_sanity_check`; not under offload): the bf16
             gradients (2 B) and a full-size fp32 gradient buffer (4 B, `fp32_groups_gradients_flat`) on
             every rank, 6N; at the accumulation boundary the engine all-reduces that buffer through a flat
             fp32 copy and its bf16 cast of up to 5e8 elements (`buffered_allreduce_fallback`), after the
             backward has freed the activations: planned as what it needs beyond them, in the buckets term.
    stage 2  the ZeRO optimizer keeps only this rank's fp32 partition (4 B / dp, its compact gradient
             partition; no 16-bit partition).
  tests/train/test_optimizers.py checks both against the gradient tensors of real engines.

Optimizer state S per parameter (`lvm.train.optimizers`; tests/train/test_optimizers.py checks master +
state against the tensors of real DeepSpeed engines after one step, to the byte):
  adamw 8 (m, v fp32) · lion 4 (m; FusedLion on GPU; DeepSpeedCPULion, used under offload and on CPU,
  also allocates an unused second moment: 8) · sgd 4 (momentum) · adamw8bit 2 + 8/256 (two uint8 states
  and an fp32 absmax per block of 256 values; bitsandbytes keeps 32-bit states, 8 B, for a tensor under
  4096 values, and a 256-entry fp32 quantile map per state). DeepSpeed hands the optimizer one flat fp32
  partition per parameter group: the trainer's two groups (decayed weights; norms and biases).

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

GPU terms DeepSpeed's estimators leave out (DeepSpeed issue #4527: estimated 0.49 GB per GPU, used 15-21 GB):
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
  * ZeRO-3 live parameters. DeepSpeed's PartitionedParameterCoordinator (partitioned_param_coordinator.py,
    `__params_to_release`) keeps a gathered 16-bit parameter after its module's forward when the
    parameters traversed until its next use number fewer than `stage3_max_reuse_distance`; in a
    training step the next use is the backward, 2 x (parameters after it in the forward order) away, so
    with the default 1e9 every module of a model under 500M parameters stays gathered until its
    backward. `stage3_max_live_parameters` only caps what is prefetched on top
    (min(prefetch bucket, max live - available)); parameters under `stage3_param_persistence_threshold`
    are never partitioned. The estimator's 4 x largest layer stays in the model states.
  * Recompute peak of a checkpointed layer: in backward the layer's activations are recomputed all
    at once and its backward adds the MLP's gate/up gradients (2 i d per token); by then the head's
    saved tensors are freed. The head's own backward peak is the two fp32 gradients of the loss
    w.r.t. log-softmax and logits (8 B per logit). The peak is the larger of the two phases
    (measured with torch.distributed._tools.mem_tracker.MemTracker on CPU, tests/plan/test_memory.py).
  * Reserve outside the allocator's tensors: the CUDA context with PyTorch's kernels (about 0.6 GiB on
    an H100 with CUDA 12 lazy module loading; nvidia-smi after `torch.cuda.init()` and a first kernel);
    cuBLAS and cuBLASLt workspaces, 32 MiB each on Hopper (PyTorch `getChosenWorkspaceSize`,
    CUBLAS_WORKSPACE_CONFIG default ":4096:8"; allocated through the caching allocator); NCCL buffers,
    cudaMalloc'ed by NCCL itself: per communicator up to 32 channels x (4 MiB Simple + ~4.5 MiB LL128 +
    0.25 MiB LL protocol buffers, NCCL_BUFFSIZE and NCCL docs "Memory"): ~288 MiB, hundreds of MB per
    communicator on H100; DeepSpeed uses two (the world group and the data-parallel group it clones,
    deepspeed/utils/groups.py); a single GPU needs none. Allocator fragmentation: reserved minus
    allocated, 10% of the allocator's peak with the default block allocator, 2% with
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (PyTorch "CUDA memory management" notes).

Temporary buffers (live at the peak, not saved tensors):
  the larger of the head's backward (8 B per logit) and a checkpointed layer's recompute peak (above);
  ZeRO-1/2 reduce bucket (x2 with overlap_comm) and allgather bucket; ZeRO-3 reduce bucket; under
  BF16_Optimizer instead the boundary all-reduce's copies, beyond the backward phase's tensors (above).

Sources: Rajbhandari et al., "ZeRO" (2020); Korthikanti et al., "Reducing Activation Recomputation in
Large Transformer Models" (2022) for the per-layer method; DeepSpeed's estimators for model states;
Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (2022); Chen et al., "Symbolic
Discovery of Optimization Algorithms" (Lion, 2023).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from lvm.model.presets import count_parameters
from lvm.train.optimizers import BNB_BLOCK, BNB_MIN_8BIT_SIZE, OPTIMIZERS, state_bytes_per_param

GiB = 2**30
MiB = 2**20
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
CUDA_CONTEXT = 600 * MiB
CUBLAS_WORKSPACE = 2 * 32 * MiB
NCCL_PER_COMMUNICATOR = 32 * 9 * MiB
NCCL_COMMUNICATORS = 2
FRAGMENTATION = 0.10
FRAGMENTATION_EXPANDABLE = 0.02
DS_DEFAULT_LIVE = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters / stage3_max_reuse_distance default
ALLREDUCE_ELEMENTS = 500_000_000  # DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE: the engine's all-reduce bucket, in elements


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


@dataclass
class Breakdown:
    params: int
    grads: int
    optimizer: int
    live_params: int       # ZeRO-3 gathered parameters kept by the reuse distance, prefetch, persistent ones
    activations: int       # saved for backward, without the attention mask
    attention_mask: int    # --packing sentence on SDPA: the per-layer additive masks (and the boolean one)
    backward_peak: int     # the larger of the head's backward and a checkpointed layer's recompute
    buckets: int           # ZeRO reduce / allgather buckets
    cublas_workspace: int
    fragmentation: int
    cuda_context: int
    nccl: int
    total: int
    cpu_per_node: int

    @property
    def buffers(self) -> int:
        return self.backward_peak + self.buckets

    @property
    def allocated(self) -> int:
        """What `torch.cuda.max_memory_allocated` should show at the peak."""
        return (self.params + self.grads + self.optimizer + self.live_params + self.activations + self.attention_mask
                + self.buffers + self.cublas_workspace)

    @property
    def reserved(self) -> int:
        """What `torch.cuda.max_memory_reserved` should show: allocated plus fragmentation."""
        return self.allocated + self.fragmentation

    @property
    def reserve(self) -> int:
        """Bytes that are not model states, activations or buffers."""
        return self.cublas_workspace + self.fragmentation + self.cuda_context + self.nccl

    def as_dict(self) -> dict:
        return {**asdict(self), "buffers": self.buffers, "allocated": self.allocated, "reserved": self.reserved,
                "reserve": self.reserve}


def largest_layer_params(cfg) -> int:
    """Parameters of the largest single module (DeepSpeed's `model_to_params`): the embedding/lm_head."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return max(cfg.vocab_size * h, h * i, h * h)


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def no_decay_params(cfg) -> int:
    """Norm weights and biases: the trainer's parameter group without weight decay."""
    h, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    hd, kv = _head_dim(cfg), cfg.num_key_value_heads or cfg.num_attention_heads
    per_layer = 2 * h
    if getattr(cfg, "attention_bias", False):
        per_layer += cfg.num_attention_heads * hd + 2 * kv * hd + h
    if getattr(cfg, "mlp_bias", False):
        per_layer += 2 * cfg.intermediate_size + h
    return n_layers * per_layer + h


def optimizer_state_bytes(cfg, optimizer: str, dp: int, cpu_impl: bool = False) -> int:
    """Bytes of optimizer state one rank keeps: per parameter group, its flat partition of ~numel/dp values."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if optimizer == "lion" and cpu_impl:
        return int(8 * count_parameters(cfg) / dp)  # DeepSpeedCPULion also allocates exp_avg_sq
    plain = no_decay_params(cfg)
    total = 0.0
    for numel in (count_parameters(cfg) - plain, plain):
        part = -(-numel // dp)
        total += state_bytes_per_param(optimizer, part) * part
        if optimizer == "adamw8bit" and part >= BNB_MIN_8BIT_SIZE:
            total += 2 * BNB_BLOCK * 4  # the two quantile maps (qmap1, qmap2)
    return int(total)


def model_states(cfg, s: Setting, dp: int, gpus_per_node: int = 1) -> tuple[int, int, int, int]:
    """(params, grads, optimizer) bytes per GPU and CPU bytes per node."""
    n = count_parameters(cfg)
    big = largest_layer_params(cfg)
    nodes = max(1, dp // gpus_per_node)
    st = s.zero_stage
    if s.dtype == "fp32":
        w, g16, g32, master = 4, 4, 0, (4 if st >= 1 else 0)
    else:
        w, g16, g32, master = 2, 2, 4, 4
    opt_dp = dp if st >= 1 else 1
    state = optimizer_state_bytes(cfg, s.optimizer, opt_dp)
    params = w * n / dp if st == 3 else w * n
    if st == 3:
        grads = (g32 or g16) * n / dp  # 16-bit gradients leave through the reduce bucket (see buffers)
    elif st == 2:
        grads = (g32 if fp32_grad_accum(s) else g16 + g32) * n / dp
    elif bf16_optimizer(s):
        grads = (g16 + g32) * n  # bf16 gradients and the full-size fp32 buffer, on every rank
    else:
        grads = g16 * n + g32 * n / dp
    optimizer = master * n / opt_dp + state
    if st == 3:
        params += 4 * big  # the largest layer gathered (weights + gradients) for its compute
    cpu = 0
    # DeepSpeed's estimators (x1.5 buffer factor) for AdamW, moved by the chosen optimizer's state size
    cpu_state = optimizer_state_bytes(cfg, s.optimizer, 1, cpu_impl=True) / n
    if s.offload_optimizer:
        optimizer = 0
        grads = 0
        if st == 3:
            cpu = n * (16 + cpu_state - 8) / nodes * 1.5
        else:
            cpu = n * max(4 * dp, 16 + cpu_state - 8) * 1.5 / nodes
    if s.offload_param:
        if st != 3:
            raise ValueError("parameter offload needs ZeRO-3")
        params = 4 * big
        cpu = n * (18 + cpu_state - 8) / nodes * 1.5
    return int(params), int(grads), int(optimizer), int(cpu)


def module_order(cfg) -> list[int]:
    """Parameter counts of the modules with parameters, in forward order (HF LlamaForCausalLM)."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd, a = _head_dim(cfg), cfg.num_attention_heads
    kv = cfg.num_key_value_heads or a
    ab, mb = getattr(cfg, "attention_bias", False), getattr(cfg, "mlp_bias", False)
    layer = [h, h * a * hd + (a * hd if ab else 0), h * kv * hd + (kv * hd if ab else 0), h * kv * hd + (kv * hd if ab else 0),
             a * hd * h + (h if ab else 0), h, h * i + (i if mb else 0), h * i + (i if mb else 0), i * h + (h if mb else 0)]
    return [v * h] + layer * cfg.num_hidden_layers + [h, v * h]


def zero3_live_params(cfg, s: Setting) -> int:
    """Gathered 16-bit parameters at the forward/backward turn beyond the estimator's largest layer (ZeRO-3)."""
    if s.zero_stage != 3:
        return 0
    d = DTYPE_BYTES[s.dtype]
    order = module_order(cfg)
    persistent = sum(m for m in order if m < s.persistence_threshold)
    retained, after = 0, 0
    for m in reversed(order):  # `after`: parameters used after this module in the forward
        if m >= s.persistence_threshold and 2 * after < s.max_reuse_distance:
            retained += m
        after += m
    prefetch = max(0, min(s.prefetch_bucket, s.max_live_parameters - retained))
    return int(d * (retained + prefetch + persistent))


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
        rope = 2 * _head_dim(cfg) * d / (1 if attn_mask else micro_batch)
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


def bucket_bytes(s: Setting) -> int:
    d = DTYPE_BYTES[s.dtype]
    if bf16_optimizer(s):  # no ZeRO buckets: the engine all-reduces (boundary_allreduce_bytes), gathers in place
        return 0
    if s.zero_stage in (1, 2):
        return int(s.reduce_bucket * d * (2 if s.overlap_comm else 1) + s.allgather_bucket * d)
    if s.zero_stage == 3:
        return int(s.reduce_bucket * d * (2 if s.overlap_comm else 1))
    return 0


def boundary_allreduce_bytes(cfg, s: Setting) -> int:
    """BF16_Optimizer (ZeRO-1): the engine's all-reduce of the fp32 gradient buffer at the accumulation boundary
    flattens up to ALLREDUCE_ELEMENTS of it (plus the tensor that crosses the limit) into an fp32 copy and casts that
    to bf16 for the collective: 6 B per element, alive after the backward (its saved tensors are freed by then)."""
    if not bf16_optimizer(s):
        return 0
    return 6 * min(count_parameters(cfg), ALLREDUCE_ELEMENTS + largest_layer_params(cfg))


def temporary_bytes(cfg, s: Setting, seq_len: int) -> int:
    peak = backward_peak_bytes(cfg, s.micro_batch, seq_len, s.grad_ckpt, s.dtype, s.attn_mask)
    act = activation_bytes(cfg, s.micro_batch, seq_len, s.grad_ckpt, s.dtype, s.attn_mask)
    return peak + bucket_bytes(s) + max(0, boundary_allreduce_bytes(cfg, s) - act - peak)


def breakdown(cfg, s: Setting, seq_len: int, dp: int, gpus_per_node: int = 1) -> Breakdown:
    params, grads, optimizer, cpu = model_states(cfg, s, dp, gpus_per_node)
    live = zero3_live_params(cfg, s)
    act = activation_bytes(cfg, s.micro_batch, seq_len, s.grad_ckpt, s.dtype)
    mask = activation_bytes(cfg, s.micro_batch, seq_len, s.grad_ckpt, s.dtype, s.attn_mask) - act
    peak = backward_peak_bytes(cfg, s.micro_batch, seq_len, s.grad_ckpt, s.dtype, s.attn_mask)
    # the boundary phase (BF16_Optimizer's all-reduce copy) needs what the backward phase's tensors do not cover
    buckets = bucket_bytes(s) + max(0, boundary_allreduce_bytes(cfg, s) - act - mask - peak)
    allocated = params + grads + optimizer + live + act + mask + peak + buckets + CUBLAS_WORKSPACE
    frag = int((FRAGMENTATION_EXPANDABLE if s.expandable_segments else FRAGMENTATION) * allocated)
    nccl = NCCL_COMMUNICATORS * NCCL_PER_COMMUNICATOR if dp > 1 else 0
    total = allocated + frag + CUDA_CONTEXT + nccl
    return Breakdown(params, grads, optimizer, live, act, mask, peak, buckets, CUBLAS_WORKSPACE, frag, CUDA_CONTEXT,
                     nccl, total, cpu)
