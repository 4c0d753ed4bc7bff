"""Learning-rate schedule: linear warmup to the peak, cosine decay to `min_lr` at `max_steps`."""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, min_lr: float, warmup: int, max_steps: int) -> float:
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


def lambda_schedule(peak: float, min_lr: float, warmup: int, max_steps: int):
    """A multiplier for torch.optim.lr_scheduler.LambdaLR over an optimizer whose lr is `peak`."""
    return lambda step: lr_at(step, peak, min_lr, warmup, max_steps) / peak if peak > 0 else 0.0
