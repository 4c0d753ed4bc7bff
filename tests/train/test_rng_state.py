"""The RNG state in a checkpoint is each rank's own: its current CUDA device's generator, not every visible GPU's.

No GPU is needed: a stand-in for torch.cuda holds one generator state per device and fails, as CUDA does, for
a device index the process cannot see.
"""

import random

import numpy as np
import torch

from lvm.train import checkpoint as ckpt


class FakeCuda:
    """`n` visible devices, the current one `current`; a state per device (a ByteTensor naming the device)."""

    def __init__(self, monkeypatch, n: int, current: int, states: dict[int, torch.Tensor] | None = None):
        self.n, self.current = n, current
        self.states = states if states is not None else {i: self.state_of(f"gpu{i}") for i in range(n)}
        self.set_calls = []
        for mod in (torch.cuda, torch.cuda.random):  # torch.cuda.random's own names are what get/set_rng_state_all call
            monkeypatch.setattr(mod, "device_count", lambda: self.n, raising=False)
            monkeypatch.setattr(mod, "current_device", lambda: self.current, raising=False)
            monkeypatch.setattr(mod, "get_rng_state", self.get_rng_state, raising=False)
            monkeypatch.setattr(mod, "set_rng_state", self.set_rng_state, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    @staticmethod
    def state_of(name: str) -> torch.Tensor:
        return torch.tensor(list(name.ljust(16).encode()), dtype=torch.uint8)

    def index(self, device) -> int:
        if isinstance(device, str):
            device = torch.device(device)
        idx = device if isinstance(device, int) else device.index
        idx = self.current if idx is None else idx
        if not 0 <= idx < self.n:
            raise RuntimeError(f"CUDA error: invalid device ordinal {idx} (this process sees {self.n} device(s))")
        return idx

    def get_rng_state(self, device="cuda"):
        return self.states[self.index(device)].clone()

    def set_rng_state(self, new_state, device="cuda"):
        idx = self.index(device)
        self.set_calls.append(idx)
        self.states[idx] = new_state.clone()


def test_own_device_state_restores_where_the_process_sees_one_gpu(monkeypatch):
    """Saved by a rank whose current device was GPU 3 of 8 visible; resumed where that rank sees one GPU."""
    FakeCuda(monkeypatch, n=8, current=3)
    saved = ckpt.rng_state()
    resumed = FakeCuda(monkeypatch, n=1, current=0, states={0: FakeCuda.state_of("fresh")})
    ckpt.set_rng_state(saved)
    assert resumed.set_calls == [0]
    assert bytes(resumed.states[0].tolist()).decode().strip() == "gpu3"  # its own device's state, on its own device


def test_each_rank_restores_its_own_state(monkeypatch):
    """The client state holds every rank's state (ZeRO-1/2 write it once, from rank 0): rank r takes entry r."""
    per_rank = []
    for r in range(3):  # three ranks, each with one visible GPU (its own), each generator in its own state
        FakeCuda(monkeypatch, n=1, current=0, states={0: FakeCuda.state_of(f"rank{r}")})
        torch.manual_seed(100 + r)
        per_rank.append(ckpt.rng_state())
    saved = {"ranks": per_rank}
    for r in range(3):  # resumed where every process sees all 3 GPUs, rank r on GPU r
        fake = FakeCuda(monkeypatch, n=3, current=r)
        ckpt.set_rng_state(saved, rank=r)
        assert fake.set_calls == [r]
        assert bytes(fake.states[r].tolist()).decode().strip() == f"rank{r}"
        assert torch.equal(torch.get_rng_state(), per_rank[r]["torch"])
    fake = FakeCuda(monkeypatch, n=4, current=3)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    ckpt.set_rng_state(saved, rank=3)  # a rank the saving run did not have keeps its seeded generators
    assert fake.set_calls == [] and torch.equal(torch.get_rng_state(), before)


def test_gathered_state_of_one_process_and_older_checkpoints(monkeypatch):
    """Without a process group the gathered state is this process's alone; an older checkpoint's list of every
    visible GPU's state restores only the current device's entry (and nothing where there is none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    state = ckpt.gather_rng_states()
    assert len(state["ranks"]) == 1 and state["ranks"][0]["cuda"] is None
    want = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.set_rng_state(state, rank=0)
    assert (random.random(), np.random.rand()) == want[:2] and torch.equal(torch.rand(1), want[2])

    old = {**state["ranks"][0], "cuda": [FakeCuda.state_of(f"gpu{i}") for i in range(8)]}
    fake = FakeCuda(monkeypatch, n=1, current=0, states={0: FakeCuda.state_of("fresh")})
    ckpt.set_rng_state(old)
    assert fake.set_calls == [0] and bytes(fake.states[0].tolist()).decode().strip() == "gpu0"
    fake = FakeCuda(monkeypatch, n=9, current=8)
    ckpt.set_rng_state(old, rank=0)
    assert fake.set_calls == []

