import pytest

from lvm.launch_env import expand_nodelist, launch_env


def test_nodelist_expansion():
    assert expand_nodelist("gpu[01-03,07],cpu-a[1-2],login") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu-a1", "cpu-a2", "login"]
    assert expand_nodelist("n[8-10]") == ["n8", "n9", "n10"]
    assert expand_nodelist("rack[1-2]-n[1-2]") == ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]
    with pytest.raises(ValueError):
        expand_nodelist("n[3-1]")


def test_launch_env_sources():
    assert launch_env({}).world_size == 1
    torch_env = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (torch_env.rank, torch_env.local_rank, torch_env.world_size, torch_env.master_addr, torch_env.master_port) == (3, 1, 8, "h0", 1234)
    slurm = launch_env({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[07-10]"})
    assert (slurm.rank, slurm.local_rank, slurm.world_size, slurm.master_addr, slurm.launcher) == (5, 1, 8, "gpu07", "slurm")


def test_processes_per_node_under_every_launcher():
    """What a node holds of the job (the planner's CPU bytes per node): torchrun's LOCAL_WORLD_SIZE, DeepSpeed's
    LOCAL_SIZE; under srun (neither set) SLURM's tasks per node or its node count; a lone process: the whole job."""
    from lvm.launch_env import procs_per_node

    assert procs_per_node(16, {"LOCAL_WORLD_SIZE": "8"}) == 8
    assert procs_per_node(16, {"LOCAL_SIZE": "4"}) == 4
    srun = {"SLURM_PROCID": "9", "SLURM_NTASKS": "32", "SLURM_LOCALID": "1"}
    assert procs_per_node(32, {**srun, "SLURM_NNODES": "4"}) == 8
    assert procs_per_node(32, {**srun, "SLURM_JOB_NUM_NODES": "8"}) == 4
    assert procs_per_node(32, {**srun, "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2"}) == 8
    assert procs_per_node(32, {**srun, "SLURM_STEP_NUM_NODES": "2", "SLURM_NNODES": "4"}) == 16  # this step's nodes
    assert procs_per_node(1, {"SLURM_NNODES": "2"}) == 1  # one process in a 2-node allocation
    assert procs_per_node(12, {**srun, "SLURM_NNODES": "5"}) == 12  # uneven: counted as one node (no less CPU memory)
    assert procs_per_node(8, {}) == 8
