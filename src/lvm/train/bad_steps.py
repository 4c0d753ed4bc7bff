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
