"""What a run must carry across a restart besides the engine's weights and optimizer: `TrainState`."""

from __future__ import annotations

from dataclasses import dataclass

from lvm.train import checkpoint as ckpt


@dataclass
class TrainState:
    """The step, the loader's position in the data and every rank's generators (saved in each checkpoint's
    client state; `lvm.train.checkpoint.Checkpointer` writes and reads it)."""

    loader: object  # lvm.data.mixture.DistributedLoader: its own state_dict() / load_state_dict()
    rank: int
    step: int = 0
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient (lvm.train.bad_steps)

    def state_dict(self) -> dict:
        """A collective where several ranks run: each rank's RNG state is gathered into rank 0's copy."""
        return {"loader": self.loader.state_dict(), "rng": ckpt.gather_rng_states(), "step": self.step,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict, data_changed: str = "refuse") -> str | None:
        """Restore from a checkpoint's client state; returns the loader's line when the data changed since."""
        changed = self.loader.load_state_dict(state["loader"], data_changed)
        ckpt.set_rng_state(state["rng"], self.rank)
        self.step, self.skipped_steps = int(state["step"]), int(state.get("skipped_steps", 0))
        return changed
