"""Where every byte of a LLaMA training step goes, per GPU, from the model config alone.

Model states (mixed-precision AdamW; DeepSpeed's own accounting, `estimate_zero{2,3}_model_states_mem_needs`):
  bf16/fp16 weights 2 B/param, gradients 2 B (16-bit) + 4 B (fp32 partition), fp32 master 4 B and
  Adam m, v 8 B: 2 + 18 = 20 B/param at one GPU, i.e. the "16-18 B/param" rule plus the fp32
  gradient copy DeepSpeed keeps. ZeRO partitions over the data-parallel size dp:
    stage 0  everything replicated
    stage 1  optimizer states (12 B) / dp
    stage 2  + gradients (6 B) / dp                     -> 2N + 18N/dp   (DeepSpeed, stage_1_and_2.py)
    stage 3  + weights (2 B) / dp, plus the largest layer gathered for compute (4 B x its params);
             16-bit gradients are reduce-scattered straight out of the bucket, so only the fp32
             gradient partition stays: 2 + 4 + 12 = 18 B / dp -> 4L + 18N/dp (DeepSpeed, stage3.py)
  CPU offload moves the optimizer (and, at stage 3, the weights) to host memory:
    stage 2 + optimizer offload: GPU 2N;  stage 3 + optimizer offload: 4L + 2N/dp;  + params: 4L.
  Pure fp32 training keeps 4 B weights + 4 B gradients + 8 B Adam = 16 B/param.

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
  These were checked byte-for-byte against `torch.autograd.graph.saved_tensors_hooks` on CPU in fp32
  and bf16 (tests/plan/test_memory.py keeps them within 10%).

Temporary buffers (live at the peak, not saved tensors):
  logits gradient in backward: b s V (4 + d); with checkpointing, one layer's full activations while
  it is recomputed; ZeRO-1/2 reduce bucket (x2 with overlap_comm) and allgather bucket; ZeRO-3 the
  prefetch bucket and reduce bucket.
Reserve: 1 GiB for the CUDA context, cuBLAS workspace and NCCL, plus 5% for allocator fragmentation.

Sources: Rajbhandari et al., "ZeRO" (2020); Korthikanti et al., "Reducing Activation Recomputation in
Large Transformer Models" (2022) for the per-layer method; DeepSpeed's estimators for model states.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lvm.model.presets import count_parameters

GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
CONTEXT_RESERVE = 1 * GiB
FRAGMENTATION = 0.05


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


@dataclass
class Breakdown:
    params: int
    grads: int
    optimizer: int
    activations: int
    buffers: int
    reserve: int
    total: int
    cpu_per_node: int

    def as_dict(self) -> dict:
        return asdict(self)


def largest_layer_params(cfg) -> int:
    """Parameters of the largest single module (DeepSpeed's `model_to_params`): the embedding/lm_head."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return max(cfg.vocab_size * h, h * i, h * h)


def model_states(cfg, s: Setting, dp: int, gpus_per_node: int = 1) -> tuple[int, int, int, int]:
    """(params, grads, optimizer) bytes per GPU and CPU bytes per node."""
    n = count_parameters(cfg)
    big = largest_layer_params(cfg)
    nodes = max(1, dp // gpus_per_node)
    if s.dtype == "fp32":
        w, g16, g32, opt = 4, 4, 0, 8
    else:
        w, g16, g32, opt = 2, 2, 4, 12
    st = s.zero_stage
    params = w * n / dp if st == 3 else w * n
    if st == 3:
        grads = (g32 or g16) * n / dp  # 16-bit gradients leave through the reduce bucket (see buffers)
    elif st == 2:
        grads = (g16 + g32) * n / dp
    else:
        grads = g16 * n + g32 * n / dp
    optimizer = opt * n / dp if st >= 1 else opt * n
    if st == 3:
        params += 4 * big  # the largest layer gathered (weights + gradients) for its compute
    cpu = 0
    if s.offload_optimizer:
        optimizer = 0
        if st == 3:
            grads = 0
            cpu = n * 16 / nodes * 1.5
        else:
            grads = 0
            cpu = n * max(4 * dp, 16) * 1.5 / nodes
    if s.offload_param:
        if st != 3:
            raise ValueError("parameter offload needs ZeRO-3")
        params = 4 * big
        cpu = n * 18 / nodes * 1.5
    return int(params), int(grads), int(optimizer), int(cpu)


def layer_bytes_per_token(cfg, d: int) -> int:
    h, i, a = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    return (8 * h + 4 * i) * d + 8 * h + 4 * a + 8


def activation_bytes(cfg, micro_batch: int, seq_len: int, grad_ckpt: bool, dtype: str = "bf16") -> int:
    """Bytes saved for backward by one forward pass of LlamaForCausalLM (with the loss)."""
    d = DTYPE_BYTES[dtype]
    h, n_layers, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    tokens = micro_batch * seq_len
    head = 4 * v + 4 * h + 2 * h * d + 20
    if grad_ckpt:
        per_token = n_layers * h * d + head
    else:
        rope = 2 * (h // cfg.num_attention_heads) * d / micro_batch
        per_token = n_layers * layer_bytes_per_token(cfg, d) + head + rope
    return int(per_token * tokens)


def temporary_bytes(cfg, s: Setting, seq_len: int) -> int:
    d = DTYPE_BYTES[s.dtype]
    tokens = s.micro_batch * seq_len
    tmp = tokens * cfg.vocab_size * (4 + d)  # d(loss)/d(logits), fp32 and compute dtype
    if s.grad_ckpt:
        tmp += tokens * layer_bytes_per_token(cfg, d)  # one layer recomputed at a time
    if s.zero_stage in (1, 2):
        tmp += s.reduce_bucket * d * (2 if s.overlap_comm else 1) + s.allgather_bucket * d
    elif s.zero_stage == 3:
        tmp += s.prefetch_bucket * d + s.reduce_bucket * d * (2 if s.overlap_comm else 1)
    return int(tmp)


def breakdown(cfg, s: Setting, seq_len: int, dp: int, gpus_per_node: int = 1) -> Breakdown:
    params, grads, optimizer, cpu = model_states(cfg, s, dp, gpus_per_node)
    act = activation_bytes(cfg, s.micro_batch, seq_len, s.grad_ckpt, s.dtype)
    buf = temporary_bytes(cfg, s, seq_len)
    used = params + grads + optimizer + act + buf
    reserve = int(CONTEXT_RESERVE + FRAGMENTATION * used)
    return Breakdown(params, grads, optimizer, act, buf, reserve, used + reserve, cpu)
