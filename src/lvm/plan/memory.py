"""Where every byte of a LLaMA training step goes, per GPU, from the model config alone: the sum (`breakdown`).

Model states and ZeRO-3's live parameters: `lvm.plan.model_states`; activations, the attention mask of packed
windows and the backward peak: `lvm.plan.activations`; a run's settings: `lvm.plan.setting`. Here: the
buffers and the reserve, which DeepSpeed's estimators leave out (DeepSpeed issue #4527: estimated 0.49 GB per
GPU, used 15-21 GB), and the total.

Reserve outside the allocator's tensors:
  * the CUDA context with PyTorch's kernels (about 0.6 GiB on an H100 with CUDA 12 lazy module loading;
    nvidia-smi after `torch.cuda.init()` and a first kernel); cuBLAS and cuBLASLt workspaces, 32 MiB each on
    Hopper (PyTorch `getChosenWorkspaceSize`, CUBLAS_WORKSPACE_CONFIG default ":4096:8"; allocated through the
    caching allocator); NCCL buffers, cudaMalloc'ed by NCCL itself: per communicator up to 32 channels x (4 MiB
    Simple + ~4.5 MiB LL128 + 0.25 MiB LL protocol buffers, NCCL_BUFFSIZE and NCCL docs "Memory"): ~288 MiB,
    hundreds of MB per communicator on H100; DeepSpeed uses two (the world group and the data-parallel group it
    clones, deepspeed/utils/groups.py); a single GPU needs none. Allocator fragmentation: reserved minus
    allocated, 10% of the allocator's peak with the default block allocator, 2% with
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (PyTorch "CUDA memory management" notes).

Temporary buffers (live at the peak, not saved tensors):
  the larger of the head's backward (8 B per logit) and a checkpointed layer's recompute peak (in
  `lvm.plan.activations`); ZeRO-1/2 reduce bucket (x2 with overlap_comm) and allgather bucket; ZeRO-3 reduce
  bucket; under BF16_Optimizer instead the boundary all-reduce's copies, beyond the backward phase's tensors
  (`boundary_allreduce_bytes`; the ZeRO-1 accounting is in `lvm.plan.model_states`).

Sources: Rajbhandari et al., "ZeRO" (2020); Korthikanti et al., "Reducing Activation Recomputation in
Large Transformer Models" (2022) for the per-layer method; DeepSpeed's estimators for model states;
Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (2022); Chen et al., "Symbolic
Discovery of Optimization Algorithms" (Lion, 2023).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lvm.model.presets import count_parameters
from lvm.plan.activations import activation_bytes, backward_peak_bytes
from lvm.plan.model_states import largest_layer_params, model_states, zero3_live_params
from lvm.plan.setting import DTYPE_BYTES, MiB, Setting, bf16_optimizer

CUDA_CONTEXT = 600 * MiB
CUBLAS_WORKSPACE = 2 * 32 * MiB
NCCL_PER_COMMUNICATOR = 32 * 9 * MiB
NCCL_COMMUNICATORS = 2
FRAGMENTATION = 0.10
FRAGMENTATION_EXPANDABLE = 0.02
ALLREDUCE_ELEMENTS = 500_000_000  # DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE: the engine's all-reduce bucket, in elements


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
