"""The pretraining run: its components (`lvm.train.components`), one optimizer step (`train_step`), and the
loop that steps, logs, validates and checkpoints until --max-steps or a stop signal (`loop`)."""

from __future__ import annotations

from contextlib import closing

import torch
import torch.distributed as dist

from lvm.data.shards.format import ShardError
from lvm.data.windows.batch import causal_lm_loss
from lvm.model.attention import packed_attention_kwargs
from lvm.model.vocab import PAD_ID
from lvm.train import bad_steps
from lvm.train import checkpoint as ckpt
from lvm.train.checkpointer import StopRequest, agree
from lvm.train.components import Components, build
from lvm.train.ds_config import ConfigError
from lvm.train.options import RunOptions

USER_ERRORS = (ShardError, ConfigError, ckpt.CheckpointError, ValueError, FileNotFoundError)


def shutdown(barrier: bool) -> None:
    """Leave the process group cleanly: a gloo/NCCL group left to interpreter exit can abort the process."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def train(opts: RunOptions, given: set[str]) -> int:
    try:
        rc = _train(opts, given)
    except BaseException:
        shutdown(barrier=False)  # another rank may not have failed: do not wait for it
        raise
    shutdown(barrier=True)
    return rc


def train_step(c: Components) -> tuple[bool, bool, bool]:
    """One optimizer step of --grad-accum micro-steps; (a non-finite loss on some rank, stop requested, save
    due by the clock), as the ranks agreed. Losses stay on the device: the host syncs once per step, for one
    all-reduce carrying those flags just before the update."""
    nonfinite = torch.zeros((), device=c.device)
    for micro in range(c.opts.grad_accum):
        b = c.loader.next_batch()
        c.metrics.add_batch(b, PAD_ID)
        batch = b.model_inputs(c.device)  # the loss: mean over every position with a target (shift_labels)
        out = c.engine(**batch, **packed_attention_kwargs(batch.get("position_ids"), c.attention, c.dtype), use_cache=False)
        loss = causal_lm_loss(c.engine, out, batch["shift_labels"])
        ok = torch.isfinite(loss.detach())
        nonfinite += ~ok
        c.metrics.add_loss(loss, ok, out.logits, batch["shift_labels"], b.sources)
        del out
        c.engine.backward(torch.where(ok, loss, loss.nan_to_num(0.0, 0.0, 0.0) * 0.0))
        if micro == c.opts.grad_accum - 1:
            bad_loss, stop_now, save_due = agree([nonfinite, *c.checkpointer.requests()], c.device)
            bad_steps.set_lr(c.optimizer, c.sched.lr_at(c.state.step))  # a function of the step number only
            c.bad_steps.gate.closed = bad_loss  # no update, optimizer state untouched (lvm.train.bad_steps)
        c.engine.step()
    c.bad_steps.gate.closed = False
    c.state.step += 1
    return bad_loss, stop_now, save_due


def _train(opts: RunOptions, given: set[str]) -> int:
    stop = StopRequest()  # from the start: SLURM's SIGTERM may come at any time
    c = build(opts, given, stop)  # every check before any compute; None: nothing to train, nothing written
    if c is None:
        return 0
    with closing(c.log):
        return loop(c)


def loop(c: Components) -> int:
    opts, state, log, saver = c.opts, c.state, c.log, c.checkpointer
    if agree(saver.requests()[:1], c.device)[0]:  # signalled while starting: nothing trained since the checkpoint
        log.console("stopping on request before the first step; nothing new to save")
        return 0
    c.engine.train()
    while state.step < opts.max_steps:
        bad_loss, stop_now, save_due = train_step(c)
        c.bad_steps.after_step(state, bad_loss, c.engine.was_step_applied())
        if state.step % opts.log_every == 0 or state.step == opts.max_steps:
            c.metrics.log_step(state.step, c.sched.lr_at(state.step - 1), c.engine.get_global_grad_norm(),
                               state.skipped_steps, c.loader)
        if c.validate.due(state.step) and not stop_now:  # signalled: the grace time is for the save
            with c.metrics.paused():
                c.validate(c.engine, state.step)
        if stop_now:
            with c.metrics.paused():
                saver.save(state, f"signal {saver.stop.name}")
            log.console(saver.stop.stopping_line())
            return 0
        reason = saver.after_step(state, save_due)
        if reason:
            with c.metrics.paused():
                saver.save(state, reason)
    with c.metrics.paused():
        c.validate(c.engine, state.step)
        saver.save(state, "end of training")
    return 0
