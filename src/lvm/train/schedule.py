"""Learning-rate schedules, set in steps that do not move when a run is cut into jobs.

- `cosine` (LVM): linear warmup to the peak over `warmup` steps, cosine decay to `min_lr` at
  `decay_steps`, then `min_lr`. LVM-7B: 8k warmup, cosine over 288k of 400k steps.
- `wsd` (warmup-stable-decay): warmup, the peak until the last `decay_fraction` of `decay_steps`,
  then a linear decay to `min_lr` at `decay_steps`, then `min_lr`.
- `constant`: warmup, then the peak.

`decay_steps` defaults to the run's `max_steps` when the run starts; it is then part of the run
(saved with the checkpoints), so raising `--max-steps` on resume extends the run at its final
learning rate instead of stretching the decay under the steps already taken. A schedule whose
warmup does not end before its decay does is refused (`ScheduleError`), not run without decay.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SCHEDULES = ("cosine", "wsd", "constant")


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class Schedule:
    kind: str = "cosine"
    peak: float = 1.5e-4
    min_lr: float = 3e-5
    warmup: int = 8000
    decay_steps: int = 1000
    decay_fraction: float = 0.2

    def check(self) -> Schedule:
        if self.kind not in SCHEDULES:
            raise ScheduleError(f"--lr-schedule must be one of {list(SCHEDULES)}, got {self.kind!r}")
        if self.peak < 0 or self.min_lr < 0 or self.min_lr > self.peak:
            raise ScheduleError(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.peak})")
        if self.warmup < 0 or self.decay_steps < 1:
            raise ScheduleError("--warmup-steps must be >= 0 and --decay-steps >= 1")
        if self.kind == "constant":
            return self
        if self.warmup >= self.decay_steps:
            raise ScheduleError(f"--warmup-steps {self.warmup} must end before the decay does at step {self.decay_steps} "
                                "(--decay-steps, default --max-steps): lower the warmup or raise --decay-steps")
        if self.kind == "wsd":
            if not 0 < self.decay_fraction <= 1:
                raise ScheduleError(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
            if self.decay_start < self.warmup:
                raise ScheduleError(f"the WSD decay starts at step {self.decay_start}, inside the warmup "
                                    f"({self.warmup} steps): lower --decay-fraction or the warmup")
        return self

    @property
    def decay_start(self) -> int:
        if self.kind == "wsd":
            return self.decay_steps - max(1, round(self.decay_fraction * self.decay_steps))
        return self.warmup

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if self.warmup > 0 and step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.peak
        if step >= self.decay_steps:
            return self.min_lr
        start = self.decay_start
        if step < start:
            return self.peak
        progress = (step - start) / max(1, self.decay_steps - start)
        if self.kind == "cosine":
            return self.min_lr + 0.5 * (self.peak - self.min_lr) * (1 + math.cos(math.pi * progress))
        return self.peak + (self.min_lr - self.peak) * progress

    def multiplier(self):
        """For torch.optim.lr_scheduler.LambdaLR over an optimizer whose lr is the peak."""
        peak = self.peak
        return lambda step: self.lr_at(step) / peak if peak > 0 else 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, peak: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """Cosine schedule decaying at `max_steps` (kept for callers of the plain function)."""
    return Schedule("cosine", peak, min_lr, warmup, max(max_steps, 1)).lr_at(step)


def lambda_schedule(peak: float, min_lr: float, warmup: int, max_steps: int):
    """A multiplier for torch.optim.lr_scheduler.LambdaLR over an optimizer whose lr is `peak`."""
    return Schedule("cosine", peak, min_lr, warmup, max(max_steps, 1)).multiplier()
