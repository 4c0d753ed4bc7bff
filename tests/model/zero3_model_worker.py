"""One process: a tiny LlamaForCausalLM built inside deepspeed.zero.Init as the trainer builds it under ZeRO-3;
prints what lvm.model.kernels decides for Liger's fused loss with and without the partitioning."""

import json

import deepspeed
import torch

from lvm.model.kernels import fused_loss_unavailable, zero3_partitioned
from lvm.model.presets import llama_config
from lvm.train.engine import build_model

deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
cfg = llama_config("tiny", 64)
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
plain, _ = build_model(cfg, {"zero_optimization": {"stage": 2}}, False)  # first: ZeRO-3's config stays live below
model, keep = build_model(cfg, ds, False)
print("RESULT " + json.dumps({"partitioned": zero3_partitioned(model), "head_numel": model.lm_head.weight.numel(),
                              "why": fused_loss_unavailable(model, False), "plain_partitioned": zero3_partitioned(plain),
                              "plain_why": fused_loss_unavailable(plain, False),
                              "plain_logits_why": fused_loss_unavailable(plain, True)}), flush=True)
torch.distributed.destroy_process_group()
