"""The run's checkpointer: when to save (every N steps, every N minutes, on SIGTERM / SIGUSR1), saving a tag
with the run's state, pruning old tags, and loading the tag a run resumes from (converted once into a
universal checkpoint when the number of ranks changed, `lvm.train.elastic`). The format of a checkpoint
folder is `lvm.train.checkpoint`'s."""

from __future__ import annotations

import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from lvm.train import checkpoint as ckpt
from lvm.train import elastic
from lvm.train.state import TrainState


class StopRequest:
    """SIGTERM / SIGUSR1 (cluster pre-emption): finish the step, save, exit cleanly. Installed when the run
    starts: SLURM's SIGTERM may come at any time."""

    def __init__(self):
        self.signal = None
        self.since = None  # time.monotonic() of the first request
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signal is None:
            self.since = time.monotonic()
        self.signal = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signal or signal.SIGTERM).name

    def stopping_line(self) -> str:
        # launchers kill workers a fixed time after SIGTERM (torchrun and the deepspeed launcher: 30 s;
        # launch/README.md): this is what the grace must cover
        waited = f" {time.monotonic() - self.since:.1f}s after the signal" if self.since is not None else ""
        return f"stopping on request{waited}; resume with --resume auto"


class SaveTimer:
    """`--save-every-minutes`: due when that much wall time passed since the last save (or the start)."""

    def __init__(self, minutes: float | None):
        self.seconds = minutes * 60 if minutes else None
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = time.monotonic()


def agree(flags: list, device) -> list[bool]:
    """Every rank's flags (numbers or 0-d tensors on `device`, non-zero for true), OR-ed over the ranks: one
    all-reduce, one host sync."""
    t = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=device) for f in flags])
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


class Checkpointer:
    """Saves and loads the run's checkpoints in `ckpt_dir` (engine state + `TrainState` + the run's identity)."""

    def __init__(self, ckpt_dir: Path, engine, opts, ds: dict, sched, identity: dict, world_size: int, rank: int,
                 stop: StopRequest, log):
        self.ckpt_dir, self.engine, self.opts, self.ds, self.sched = ckpt_dir, engine, opts, ds, sched
        self.identity, self.world_size, self.rank0, self.stop, self.log = identity, world_size, rank == 0, stop, log
        self.timer = SaveTimer(opts.save_every_minutes)

    def requests(self) -> list[float]:
        """This rank's [stop requested, save due by the clock], for the ranks to agree on with the step's flags."""
        return [1.0 if self.stop.signal else 0.0, 1.0 if self.timer.due() else 0.0]

    def load(self, where: tuple[Path, str], state: TrainState, optimizer) -> None:
        """Load the tag `where` (`elastic.prepare_load`) into the engine and `state`."""
        client = elastic.load(self.engine, optimizer, where)
        changed = state.load_state_dict(client, self.opts.data_changed)
        if changed:
            self.log.console(changed)

    def after_step(self, state: TrainState, save_due: bool) -> str | None:
        """Why the step just taken is saved (periodic or by the clock), or None; never the last step (the end
        of training saves it)."""
        if state.step >= self.opts.max_steps:
            return None
        if state.step % self.opts.save_every == 0:
            return "periodic"
        return f"{self.opts.save_every_minutes:g} minutes since the last checkpoint" if save_due else None

    def save(self, state: TrainState, reason: str) -> None:
        t = time.monotonic()
        tag = ckpt.tag_for(state.step)
        if self.rank0:  # before DeepSpeed's files: a tag that 'latest' names always has it
            ckpt.write_run_state(self.ckpt_dir / tag, elastic.run_state(
                state.step, self.world_size, self.opts, self.ds, self.sched, state.skipped_steps,
                data=state.loader.state_dict()))
        client = {**state.state_dict(), "identity": self.identity, "options": asdict(self.opts),
                  "schedule": self.sched.as_dict()}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client)
        if dist.is_initialized():
            dist.barrier()
        if self.rank0:
            ckpt.prune(self.ckpt_dir, self.opts.keep_last)
        self.timer.saved()
        self.log.console(f"saved checkpoint {self.ckpt_dir / tag} ({reason}) in {time.monotonic() - t:.1f}s")
