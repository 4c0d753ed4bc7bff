"""A non-finite loss skips the update, leaving the weights, the optimizer state and the schedule alone.

The ranks agree (one all-reduce, in the training loop) that some micro-step of this optimizer step had a
non-finite loss; `engine.step()` must still run on every rank (it clears the accumulated gradient
partitions and keeps ZeRO's collectives in step), so the gate makes it a step without an update: the
innermost optimizer's `step()` (the one holding Adam's moments and step counts, under whichever
DeepSpeed wrapper: ZeRO-1/2/3, bf16, fp16) returns without touching anything. The learning rate is a
function of the step number (`Schedule.lr_at`), set before every update, so a skipped update never
shifts the schedule. DeepSpeed's own skips for a non-finite gradient norm go through the same
accounting; an fp16 loss-scale overflow (normal while the scale settles) is not a bad step.
"""

from __future__ import annotations


def innermost_optimizer(opt):
    """The optimizer object that owns the parameter state under DeepSpeed's wrappers."""
    seen = set()
    while hasattr(opt, "optimizer") and id(opt) not in seen:
        seen.add(id(opt))
        opt = opt.optimizer
    return opt


class UpdateGate:
    """While `closed`, the innermost optimizer's step does nothing (counted in `blocked`)."""

    def __init__(self, optimizer):
        self.base = innermost_optimizer(optimizer)
        self.closed = False
        self.blocked = 0
        step = self.base.step

        def gated_step(*args, **kwargs):
            if self.closed:
                self.blocked += 1
                return None
            return step(*args, **kwargs)

        self.base.step = gated_step


def set_lr(optimizer, lr: float) -> None:
    """The learning rate of the next update, on every parameter group."""
    for g in optimizer.param_groups:
        g["lr"] = lr


def classify(bad_loss: bool, applied: bool, precision: str) -> str | None:
    """None for a normal step, else why the update was skipped: 'loss' (non-finite loss), 'grad'
    (DeepSpeed found a non-finite gradient norm) or 'overflow' (fp16 loss scale; not a bad step)."""
    if bad_loss:
        return "loss"
    if applied:
        return None
    return "overflow" if precision == "fp16" else "grad"


class BadSteps:
    """The gate on the run's optimizer, and the accounting after each step: a skipped update is counted in the
    run's state and logged; `max_in_row` of them in a row stop the run."""

    def __init__(self, optimizer, max_in_row: int, precision: str, log):
        self.gate = UpdateGate(optimizer)
        self.max_in_row, self.precision, self.log = max_in_row, precision, log
        self.in_row = 0

    def after_step(self, state, bad_loss: bool, applied: bool) -> None:
        """`state`: the run's `TrainState` (its step already advanced); `applied`: engine.was_step_applied()."""
        why = classify(bad_loss, applied, self.precision)  # DeepSpeed itself skips (and clears) a non-finite norm
        if why == "overflow":
            self.log.console(f"step {state.step}: fp16 loss scale overflow, update skipped (loss scale lowered)")
        if why not in ("loss", "grad"):
            self.in_row = 0
            return
        state.skipped_steps += 1
        self.in_row += 1
        self.log.console(f"step {state.step}: non-finite {why}, update skipped ({self.in_row} in a row)")
        if self.in_row >= self.max_in_row:
            raise SystemExit(f"error: {self.in_row} consecutive steps had a non-finite loss or gradient norm: lower --lr, "
                             "check the data and model config, or resume from an earlier checkpoint")
