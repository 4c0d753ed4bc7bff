"""Model states per GPU: weights, gradients, fp32 master and optimizer state under each ZeRO stage and
offload, and the parameters ZeRO-3 keeps gathered (`lvm.plan.memory` adds activations and buffers).

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

ZeRO-3 live parameters (a GPU term DeepSpeed's estimators leave out): DeepSpeed's PartitionedParameterCoordinator
  (partitioned_param_coordinator.py, `__params_to_release`) keeps a gathered 16-bit parameter after its module's
  forward when the parameters traversed until its next use number fewer than `stage3_max_reuse_distance`; in a
  training step the next use is the backward, 2 x (parameters after it in the forward order) away, so with the
  default 1e9 every module of a model under 500M parameters stays gathered until its backward.
  `stage3_max_live_parameters` only caps what is prefetched on top (min(prefetch bucket, max live - available));
  parameters under `stage3_param_persistence_threshold` are never partitioned. The estimator's 4 x largest layer
  stays in the model states.
"""

from __future__ import annotations

from lvm.model.presets import count_parameters
from lvm.plan.setting import DTYPE_BYTES, Setting, bf16_optimizer, fp32_grad_accum, head_dim
from lvm.train.optimizers import BNB_BLOCK, BNB_MIN_8BIT_SIZE, OPTIMIZERS, state_bytes_per_param


def largest_layer_params(cfg) -> int:
    """Parameters of the largest single module (DeepSpeed's `model_to_params`): the embedding/lm_head."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return max(cfg.vocab_size * h, h * i, h * h)


def no_decay_params(cfg) -> int:
    """Norm weights and biases: the trainer's parameter group without weight decay."""
    h, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    hd, kv = head_dim(cfg), cfg.num_key_value_heads or cfg.num_attention_heads
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
    hd, a = head_dim(cfg), cfg.num_attention_heads
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
