"""Learning-rate schedules, set in steps that do not move when a run is cut into jobs.

- `cosine` (LVM): linear warmup to the peak over `warmup` steps, cosine decay to `min_lr` at
  `decay_steps`, then `min_lr`. LVM-7B (configs/lvm-7b.yaml): 8k warmup, cosine to step 288k,
  the run ending at step 100k (400k batches of 32 sequences, 4 per optimizer step).
- `wsd` (warmup-stable-decay): warmup, the peak until the last `decay_fraction` of `decay_steps`,
  then a linear decay to `min_lr` at `decay_steps`, then `min_lr`.
- `constant`: warmup, then the peak.

`decay_steps` defaults to the run's `max_steps` when the run starts, and the warmup to LVM's 8000
steps capped at a tenth of the decay; the schedule is then part of the run (saved with every
checkpoint), so raising `--max-steps` on resume extends the run at its final learning rate instead
of stretching the decay under the steps already taken. A schedule whose warmup does not end before
its decay does is refused (`ScheduleError`), not run without decay. The learning rate of optimizer
step k is `lr_at(k)` whatever happened before it: a skipped update does not shift the schedule.
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

    def describe(self) -> str:
        if self.kind == "constant":
            return f"constant {self.peak:g} after {self.warmup} warmup steps"
        shape = (f"stable until step {self.decay_start}, linear" if self.kind == "wsd" else "cosine")
        return (f"{self.kind}: {self.warmup} warmup steps to {self.peak:g}, {shape} decay to {self.min_lr:g} "
                f"at step {self.decay_steps}")


LVM_WARMUP = 8000


def default_warmup(decay_steps: int) -> int:
    """LVM's 8000 warmup steps, at most a tenth of the decay (a 1000-step run warms up for 100)."""
    return min(LVM_WARMUP, decay_steps // 10)


def first_difference(a: Schedule, b: Schedule, steps: int) -> int | None:
    """The first step < `steps` whose learning rate differs between `a` and `b` (None: they agree)."""
    for k in range(steps):
        x, y = a.lr_at(k), b.lr_at(k)
        if abs(x - y) > 1e-12 * max(abs(x), abs(y), 1e-30):
            return k
    return None


SCHEDULE_FLAGS = {"lr_schedule": "kind", "lr": "peak", "min_lr": "min_lr", "warmup_steps": "warmup",
                  "decay_steps": "decay_steps", "decay_fraction": "decay_fraction"}


def run_schedule(opts, given: set[str], saved: dict | None = None, step: int = 0) -> Schedule:
    """The schedule of this run, from the flags of a new run or the one saved with the checkpoint.

    A new run: `decay_steps` defaults to `--max-steps` and the warmup to `default_warmup`. A resumed
    run keeps the saved schedule; flags given explicitly replace its fields only where the result
    gives every step already taken (< `step`) the learning rate it had, so raising `--max-steps`, or
    moving a WSD decay that has not started, is fine, and rewriting the past is an error.
    """
    if saved is None:
        decay = opts.decay_steps if opts.decay_steps is not None else opts.max_steps
        warmup = opts.warmup_steps if opts.warmup_steps is not None else default_warmup(decay)
        return Schedule(opts.lr_schedule, opts.lr, opts.min_lr, warmup, decay, opts.decay_fraction).check()
    old = Schedule(**saved)
    changes = {field: getattr(opts, flag) for flag, field in SCHEDULE_FLAGS.items()
               if flag in given and getattr(opts, flag) is not None and getattr(opts, flag) != getattr(old, field)}
    if not changes:
        return old.check()
    new = Schedule(**{**old.as_dict(), **changes}).check()
    k = first_difference(old, new, step)
    if k is not None:
        flags = ", ".join(f"--{f.replace('_', '-')} {getattr(opts, f)}" for f, field in SCHEDULE_FLAGS.items() if field in changes)
        raise ScheduleError(f"{flags} would change the learning rate of step {k + 1} (already taken at {old.lr_at(k):.3g}, "
                            f"now {new.lr_at(k):.3g}): the checkpoint's schedule is {old.describe()}; drop the flag(s) "
                            "to keep it, or start a new run")
    return new


def lr_at(step: int, peak: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """Cosine schedule decaying at `max_steps` (kept for callers of the plain function)."""
    return Schedule("cosine", peak, min_lr, warmup, max(max_steps, 1)).lr_at(step)
