"""Where this process sits in a job: rank, local rank, world size, rendezvous address.

One function serves every launcher: `deepspeed` and `torchrun` set RANK / LOCAL_RANK / WORLD_SIZE /
MASTER_ADDR; under `srun` (one task per GPU) they come from SLURM_PROCID / SLURM_LOCALID /
SLURM_NTASKS and the first host of SLURM_JOB_NODELIST; a plain `python` process is rank 0 of 1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed node list: 'gpu[01-03,07],cpu-a[1-2],login' -> hosts in order."""
    hosts, token, depth = [], "", 0
    for ch in nodelist + ",":
        if ch == "," and depth == 0:
            if token:
                hosts.extend(_expand_host(token))
            token = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        token += ch
    return hosts


def _expand_host(token: str) -> list[str]:
    m = re.match(r"^(.*?)\[([^\]]+)\](.*)$", token)
    if not m:
        return [token]
    prefix, ranges, rest = m.groups()
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if hi:
            width = len(lo)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {part!r} in node list")
            names = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            names = [lo]
        for n in names:
            out.extend(_expand_host(prefix + n + rest))
    return out


def launch_env(environ: dict | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "torch")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1")
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                         env.get("MASTER_ADDR", nodes[0]), port, "slurm")
    return LaunchEnv(master_port=port)


def export_torch_env(le: LaunchEnv) -> None:
    """Set the variables torch.distributed's env:// rendezvous reads."""
    os.environ.update(RANK=str(le.rank), LOCAL_RANK=str(le.local_rank), WORLD_SIZE=str(le.world_size),
                      MASTER_ADDR=le.master_addr, MASTER_PORT=str(le.master_port))


def procs_per_node(world_size: int, environ: dict | None = None) -> int:
    """Processes of this job on one node (its GPUs per node): torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's
    LOCAL_SIZE; under srun, which sets neither, SLURM_NTASKS_PER_NODE, else the world size over SLURM's node count
    (this step's SLURM_STEP_NUM_NODES, then SLURM_NNODES, SLURM_JOB_NUM_NODES). A count that does not divide the
    world size (a lone process in a larger allocation, uneven nodes), or none, puts the whole job on one node."""
    env = os.environ if environ is None else environ

    def number(key: str) -> int | None:
        try:
            v = int(str(env.get(key, "")).strip())
        except ValueError:
            return None
        return v if v > 0 else None

    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        v = number(key)
        if v is not None:
            return v if world_size % v == 0 else world_size
    for key in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        v = number(key)
        if v is not None:
            return world_size // v if world_size % v == 0 else world_size
    return world_size


def local_device(le: LaunchEnv | None = None):
    """This process's accelerator: `cuda:LOCAL_RANK` modulo the visible GPUs (a cluster that binds one
    visible GPU per task shows each task only `cuda:0`), or the CPU without one."""
    import torch

    le = le or launch_env()
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", le.local_rank % torch.cuda.device_count())


def work_slice(environ: dict | None = None) -> tuple[int, int]:
    """(slice, number of slices) of an offline job: its rank among the launcher's processes, and
    within a SLURM job array also the array task's index (SLURM_ARRAY_TASK_ID/MIN/STEP/COUNT)."""
    env = os.environ if environ is None else environ
    le = launch_env(env)
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        lo, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
        task = (int(env["SLURM_ARRAY_TASK_ID"]) - lo) // step
        return task * le.world_size + le.rank, int(env["SLURM_ARRAY_TASK_COUNT"]) * le.world_size
    return le.rank, le.world_size
