#!/usr/bin/env python
"""The planner's model-state arithmetic next to DeepSpeed's estimators for every preset, and the
time it takes to plan (from the config alone; no weights are allocated)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from lvm.model.presets import PRESETS, count_parameters, model_shape  # noqa: E402
from lvm.plan.memory import GiB, Setting, largest_layer_params, model_states  # noqa: E402
from lvm.plan.planner import Request, search  # noqa: E402


def main() -> int:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    gpus = 8
    for name in PRESETS:
        shape = model_shape(name)
        n, big = count_parameters(shape), largest_layer_params(shape)
        ours2 = sum(model_states(shape, Setting(2, 1, False), gpus, gpus)[:3])
        ours3 = sum(model_states(shape, Setting(3, 1, False), gpus, gpus)[:3])
        ds2 = estimate_zero2_model_states_mem_needs(n, gpus, 1, cpu_offload=False)[1]
        ds3 = estimate_zero3_model_states_mem_needs(n, big, gpus, 1, cpu_offload=False, cpu_offload_params=False)[1]
        rows.append([name, f"{n / 1e6:,.1f}M", f"{ours2 / GiB:.3f}", f"{ds2 / GiB:.3f}", f"{ours3 / GiB:.3f}", f"{ds3 / GiB:.3f}",
                     f"{max(abs(ours2 - ds2) / ds2, abs(ours3 - ds3) / ds3):.2%}"])
    print_table(f"Model states per GPU (GiB), bf16 AdamW, {gpus} GPUs: planner vs DeepSpeed estimators",
                ["model", "params", "ZeRO-2 ours", "ZeRO-2 DS", "ZeRO-3 ours", "ZeRO-3 DS", "max diff"], rows)
    t = time.perf_counter()
    plan = search(Request(model_shape("7b"), 8, 1, 80, None, 4096, 524288))
    dt = time.perf_counter() - t
    s = plan.setting
    print_table("Planning time", ["request", "choice", "seconds"],
                [["7b, 8 x 80 GiB, seq 4096, 0.5M tokens/step",
                  f"ZeRO-{s.zero_stage}, micro {s.micro_batch} x accum {plan.grad_accum}, ckpt {'on' if s.grad_ckpt else 'off'}", f"{dt:.4f}"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
