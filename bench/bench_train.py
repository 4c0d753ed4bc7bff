#!/usr/bin/env python
"""Training step throughput on this machine: a DeepSpeed ZeRO-2 step vs a plain PyTorch AdamW step
on the same tiny model and batch, and the data loader alone vs what a step consumes.
On a GPU it also reports MFU of the 300m and 1b presets at seq 4096 in bf16 (one GPU)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from lvm.data.mixture import DistributedLoader  # noqa: E402
from lvm.data.shards.format import write_shard  # noqa: E402
from lvm.data.shards.shard_set import open_shards  # noqa: E402
from lvm.data.windows.batch import causal_lm_loss  # noqa: E402
from lvm.data.windows.source import SourceWindows  # noqa: E402
from lvm.model.presets import attention_implementation, count_parameters, flops_per_token, llama_config  # noqa: E402
from lvm.train.engine import build_model, param_groups  # noqa: E402
from lvm.train.metrics import device_peak_flops  # noqa: E402


def make_table(tmp: Path, n: int = 400):
    rng = np.random.default_rng(0)
    rows = [{"tokens": rng.integers(0, 8192, 256 * 16, dtype=np.uint16), "n_images": 16, "kind": "video", "id": f"v{i}"}
            for i in range(n)]
    write_shard(tmp / "t-0.arrow", rows)
    return open_shards(tmp)


def step_time(step, batches, n=8, warmup=3) -> float:
    for b in batches[:warmup]:
        step(b)
    t = time.perf_counter()
    for b in batches[warmup : warmup + n]:
        step(b)
    return (time.perf_counter() - t) / n


def cpu_rows(table, seq_len=1024, micro=4) -> list:
    import deepspeed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29651")
    deepspeed.init_distributed(dist_backend="gloo")
    loader = DistributedLoader(SourceWindows(table, seq_len, "concat", 0), micro)
    batches = [loader.next_batch().model_inputs() for _ in range(12)]
    cfg = llama_config("tiny", seq_len)
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "torch_adam": True}},
          "steps_per_print": 10**9}

    torch.manual_seed(0)
    plain = build_model(cfg, ds, False)[0]
    opt = torch.optim.AdamW(param_groups(plain, 0.1), lr=1e-3, betas=(0.9, 0.95))

    def plain_step(b):
        loss = causal_lm_loss(plain, plain(**b, use_cache=False), b["shift_labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    model = build_model(cfg, ds, False)[0]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds)

    def ds_step(b):
        loss = causal_lm_loss(engine, engine(**b, use_cache=False), b["shift_labels"])
        engine.backward(loss)
        engine.step()

    t_plain = min(step_time(plain_step, batches) for _ in range(2))
    t_ds = min(step_time(ds_step, batches) for _ in range(2))
    tokens = micro * seq_len
    fresh = DistributedLoader(SourceWindows(table, seq_len, "concat", 0), micro)
    n = 200
    t = time.perf_counter()
    for _ in range(n):
        fresh.next_batch()
    loader_tps = n * tokens / (time.perf_counter() - t)
    return [
        ["plain PyTorch AdamW step (tiny, CPU fp32)", f"{tokens / t_plain:,.0f} tok/s", f"{t_plain * 1e3:.1f} ms/step"],
        ["DeepSpeed ZeRO-2 step (same model, batch)", f"{tokens / t_ds:,.0f} tok/s", f"{t_ds * 1e3:.1f} ms/step"],
        ["DeepSpeed / plain step time", f"{t_ds / t_plain:.3f}", "goal <= 1.10"],
        ["data loader alone (concat, seq 1024)", f"{loader_tps:,.0f} tok/s", f"{loader_tps / (tokens / t_ds):,.0f}x what a step consumes (goal >= 100x)"],
    ]


def gpu_step_seconds(model, opt, ids, steps: int = 10) -> float:
    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def gpu_rows() -> list:
    """MFU of the 300m and 1b presets at seq 4096, bf16, one GPU, with fused AdamW."""
    rows = []
    peak = device_peak_flops()
    for name, micro in (("300m", 4), ("1b", 2)):
        cfg = llama_config(name, 4096)
        torch.manual_seed(0)
        model = build_model(cfg, {"zero_optimization": {"stage": 0}}, grad_ckpt=False,
                            attention=attention_implementation())[0].cuda().to(torch.bfloat16)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
        ids = torch.randint(0, 8192, (micro, 4096), device="cuda")
        dt = gpu_step_seconds(model, opt, ids)
        tps = micro * 4096 / dt
        mfu = flops_per_token(cfg, 4096) * tps / peak if peak else float("nan")
        rows.append([f"{name} ({count_parameters(cfg) / 1e6:.0f}M) bf16 seq 4096 micro {micro}", f"{tps:,.0f} tok/s",
                     f"MFU {mfu:.1%}; peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"])
        del model, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return rows


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        table = make_table(Path(tmp))
        rows = cpu_rows(table)
    if torch.cuda.is_available():
        rows += gpu_rows()
    print_table("Training step", ["measure", "value", "note"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
