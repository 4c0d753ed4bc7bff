"""Cluster launch on one machine: two simulated nodes via torchrun, SLURM variables by hand, scripts."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.train.conftest import ENV, PRETRAIN, base_args, free_port, read_metrics


def launch_two(cmds_envs, timeout=300):
    procs = [subprocess.Popen(c, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c, e in cmds_envs]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, o in zip(procs, outs, strict=True):
        assert p.returncode == 0, o[-4000:]
    return outs


def test_torchrun_two_nodes(train_shards, tmp_path):
    run = tmp_path / "run"
    port = free_port()
    args = base_args(train_shards, run, "--ds_config", "ds_configs/zero2.json", "--max-steps", "3", "--save-every", "3")
    cmds = [([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(r),
              "--master-addr", "127.0.0.1", "--master-port", str(port), PRETRAIN, *args], ENV) for r in (0, 1)]
    outs = launch_two(cmds)
    assert "world 2" in outs[0]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert sorted(read_metrics(run)) == [1, 2, 3]


def test_srun_style_slurm_variables(train_shards, tmp_path):
    run = tmp_path / "run"
    port = str(free_port())
    args = base_args(train_shards, run, "--ds_config", "ds_configs/zero3.json", "--max-steps", "2", "--save-every", "2",
                     "--warmup-steps", "1")
    clean = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    cmds = [([sys.executable, PRETRAIN, *args],
             {**clean, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_NTASKS": "2",
              "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": port}) for r in (0, 1)]
    outs = launch_two(cmds)
    assert "ZeRO-3" in outs[0] and "world 2" in outs[0]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_make_shards_slices_by_rank_equal_one_run(mixed_corpus, small_tokenizer, tmp_path):
    from tests.data.test_make_shards import tree_bytes

    base = [sys.executable, "data_prep/make_shards.py", "--manifest", str(mixed_corpus["manifest"]),
            "--tokenizer", f"patch-kmeans:{small_tokenizer}", "--workers", "0", "--sentences-per-shard", "3", "--no-progress"]
    subprocess.run(base + ["--out", str(tmp_path / "one")], check=True, cwd=REPO, capture_output=True)
    for r in (1, 0):  # slices in any order, as array tasks would run
        env = {**ENV, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2"}
        env.pop("RANK", None)
        env.pop("WORLD_SIZE", None)
        subprocess.run(base + ["--out", str(tmp_path / "two")], check=True, cwd=REPO, env=env, capture_output=True)
    subprocess.run(base + ["--out", str(tmp_path / "two"), "--index-only"], check=True, cwd=REPO, capture_output=True)
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


def test_hostfile_cli(tmp_path):
    r = subprocess.run([sys.executable, "launch/hostfile.py", "--nodelist", "gpu[01-02,07],cpu-a[1-2]", "--slots", "4"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stdout.splitlines() == ["gpu01 slots=4", "gpu02 slots=4", "gpu07 slots=4", "cpu-a1 slots=4", "cpu-a2 slots=4"]
    env = {**os.environ, "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "2"}
    subprocess.run([sys.executable, "launch/hostfile.py", "-o", str(tmp_path / "hf")], cwd=REPO, env=env, check=True)
    assert (tmp_path / "hf").read_text() == "n1 slots=2\nn2 slots=2\n"
    env.pop("SLURM_JOB_NODELIST")
    r = subprocess.run([sys.executable, "launch/hostfile.py"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.startswith("error:")


SCRIPTS = sorted(str(p) for p in (REPO / "launch" / "slurm").iterdir() if p.is_file())


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", script], check=True)
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", script], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


# Stand-ins for SLURM's commands on a machine without SLURM: `srun` runs its one task here (options
# dropped), `scontrol` names this host and records a requeue. The batch script itself runs unchanged.
SRUN = """#!/usr/bin/env bash
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) echo localhost ;;
  requeue) echo "$2" >> "$REQUEUED" ;;
esac
"""


def slurm_job(tmp_path, args):
    """Start launch/slurm/pretrain.sbatch as SLURM would run the batch script of job 4242 (one task)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    submit = tmp_path / "submit"  # the job's working directory (logs/ goes there)
    submit.mkdir()
    (submit / "launch").symlink_to(REPO / "launch")
    clean = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env = {**clean, "PATH": f"{bin_dir}:{ENV['PATH']}", "VENV": str(REPO / ".venv"), "REQUEUED": str(tmp_path / "requeued"),
           "SLURM_SUBMIT_DIR": str(submit), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "MASTER_PORT": str(free_port())}
    return subprocess.Popen(["bash", str(REPO / "launch" / "slurm" / "pretrain.sbatch"), *args], cwd=submit, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_steps(run, n, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        f = run / "metrics.jsonl"
        if f.is_file() and sum('"train"' in x for x in f.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps in {timeout}s")


@pytest.mark.parametrize("how", ["time-limit", "pre-emption"])
def test_sbatch_sigterm_checkpoints_exits_0_and_requeues(train_shards, tmp_path, how):
    """time-limit: --signal=B:TERM reaches the batch script only, which forwards it; pre-emption: SLURM
    signals the script and every task at once. Either way: one checkpoint, exit 0, the job requeued."""
    run = tmp_path / "run"
    args = base_args(train_shards, run, "--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--max-steps", "400",
                     "--save-every", "1000")
    proc = slurm_job(tmp_path, args)
    wait_for_steps(run, 2, proc)
    if how == "time-limit":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "stopping on request" in out and "requeueing job 4242" in out
    assert (tmp_path / "requeued").read_text() == "4242\n"
    tag = (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run / "checkpoints" / tag / "run_state.json").read_text())
    assert 2 <= state["step"] < 400 and f"saved checkpoint {run / 'checkpoints' / tag} (signal SIGTERM)" in out


def test_save_every_minutes(train_shards, tmp_path):
    run = tmp_path / "run"
    env = {**ENV, "MASTER_PORT": str(free_port())}
    r = subprocess.run([sys.executable, PRETRAIN, *base_args(train_shards, run, "--ds_config", "ds_configs/zero2.json",
                                                             "--max-steps", "8", "--save-every", "1000", "--keep-last", "100",
                                                             "--save-every-minutes", "0.001")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    timed = [x for x in r.stdout.splitlines() if "(0.001 minutes since the last checkpoint)" in x]
    tags = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert timed and len(tags) == len(timed) + 1 and tags[-1] == "step_00000008"  # + the one at the end


def worker_pids(launcher_pid):
    """The training processes under a launcher (children and grandchildren running launch/pretrain.py)."""
    import psutil

    procs = [(p, " ".join(p.cmdline())) for p in psutil.Process(launcher_pid).children(recursive=True)]
    return [p for p, c in procs if PRETRAIN in c and "deepspeed.launcher" not in c and "torch.distributed.run" not in c]


def launcher_cmd(launcher, port, args):
    if launcher == "torchrun":  # the elastic agent: SIGTERM to the workers, SIGKILL 30 s later (--shutdown-timeout)
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), PRETRAIN, *args]
    # deepspeed's runner starts deepspeed.launcher.launch, which starts the ranks (SIGKILL 30 s after SIGTERM)
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port), PRETRAIN, *args]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_launcher_sigterm_saves_the_current_step_within_its_grace_and_resumes(train_shards, tmp_path, launcher):
    """SIGTERM to the launcher (torchrun's agent; deepspeed's per-node launcher, the process that relays it: its
    runner does not on one node): the ranks finish the step, save it, exit 0 before the launcher's SIGKILL."""
    run = tmp_path / "run"
    args = base_args(train_shards, run, "--ds_config", "ds_configs/zero2.json", "--max-steps", "400", "--save-every", "1000")
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.Popen(launcher_cmd(launcher, free_port(), args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_steps(run, 2, proc)
        target = proc.pid
        if launcher == "deepspeed":
            import psutil

            target = next(p.pid for p in psutil.Process(proc.pid).children() if "deepspeed.launcher.launch" in " ".join(p.cmdline()))
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        t0 = time.monotonic()
        os.kill(target, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert all(not w.is_running() or w.status() == "zombie" for w in workers)
    assert took < 30, f"the ranks stopped {took:.1f}s after SIGTERM: past the launcher's 30 s grace\n{out[-3000:]}"
    assert "forcefully exiting" not in out, out[-3000:]  # torchrun's word for its SIGKILL
    tag = (run / "checkpoints" / "latest").read_text().strip()
    step = json.loads((run / "checkpoints" / tag / "run_state.json").read_text())["step"]
    assert f"saved checkpoint {run / 'checkpoints' / tag} (signal SIGTERM)" in out, out[-3000:]
    assert 2 <= step < 400 and max(read_metrics(run)) == step  # the step it was in: nothing trained after it
    print(f"{launcher}: stopped {took:.1f}s after SIGTERM; " + next(x for x in out.splitlines() if "saved checkpoint" in x))
    # the job again, as a requeue would start it: --resume auto (the default) continues at step + 1
    more = subprocess.run(launcher_cmd(launcher, free_port(), [*args, "--max-steps", str(step + 1)]), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert "resumed from" in more.stdout and (run / "checkpoints" / "latest").read_text().strip() == ckpt_tag(step + 1)
    assert max(read_metrics(run)) == step + 1


def ckpt_tag(step):
    from lvm.train.checkpoint import tag_for

    return tag_for(step)
