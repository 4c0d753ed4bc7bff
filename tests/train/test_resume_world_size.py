"""Resume on another number of ranks: real DeepSpeed on CPU (gloo, fp32), ZeRO-2 and ZeRO-3, 2 -> 1 and 1 -> 2.

The same command with another number of ranks continues the run: the checkpoint is converted once into
DeepSpeed's universal format, the global batch is kept (accumulation recomputed), the data stream goes
on at the same global window, and the losses after the resume are those of the uninterrupted run.
"""

import json
import shutil
from pathlib import Path

import pytest

from lvm.train import elastic
from tests.train.conftest import base_args, read_metrics
from tests.train.one_rank import run_train_any as run_train

TAG = "step_00000003"


def cut_at(run, tag, dst):
    """A copy of `run` as its job would have left it had it ended right after saving `tag`."""
    shutil.copytree(run, dst)
    for p in (dst / "checkpoints").glob("step_*"):
        if p.name != tag:
            shutil.rmtree(p)
    (dst / "checkpoints" / "latest").write_text(tag)
    (dst / "metrics.jsonl").unlink()  # only what the resumed job logs is read back


def rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_another_number_of_ranks(train_shards, tmp_path, stage):
    common = ["--ds_config", f"ds_configs/zero{stage}.json", "--max-steps", "6", "--save-every", "3", "--keep-last", "5"]
    # 4 windows of 256 tokens per step: 2 ranks x micro 2 by default; 1 rank needs --global-batch-tokens (accum 2)
    cmd = {2: common, 1: [*common, "--global-batch-tokens", "1024"]}
    ref = {}
    for n in (2, 1):
        run_train(n, base_args(train_shards, tmp_path / f"ref{n}", *cmd[n]))
        ref[n] = read_metrics(tmp_path / f"ref{n}")
    assert sorted(ref[1]) == sorted(ref[2]) == list(range(1, 7))
    for s in range(1, 7):  # the same global batch on 1 or 2 ranks is the same run
        assert rel(ref[1][s]["loss"], ref[2][s]["loss"]) <= 1e-4, (s, ref[1][s]["loss"], ref[2][s]["loss"])

    for before, after in ((2, 1), (1, 2)):
        run = tmp_path / f"{before}to{after}"
        cut_at(tmp_path / f"ref{before}", TAG, run)
        r = run_train(after, base_args(train_shards, run, *cmd[before]))  # the job's command, another rank count
        line = next(x for x in r.stdout.splitlines() if "resumed from" in x)
        assert f"at step 3: written by {before} rank(s), now {after}" in line
        assert f"accumulation {2 // after} x {after} rank(s) = 4 windows (1024 tokens) per step" in line
        got = read_metrics(run)
        assert sorted(got) == [4, 5, 6]
        for s in got:
            assert rel(got[s]["loss"], ref[before][s]["loss"]) <= 1e-4, (before, after, s, got[s]["loss"], ref[before][s]["loss"])
            assert got[s]["lr"] == pytest.approx(ref[before][s]["lr"], rel=1e-12)
        ckpts = run / "checkpoints"
        assert (ckpts / "latest").read_text() == "step_00000006"
        assert len(list((ckpts / "step_00000006").glob("*optim_states.pt"))) == after  # saved for the new world size
        assert not (ckpts / f"{TAG}_universal").exists()  # served its one resume; pruned after the next save
        assert json.loads((ckpts / "step_00000006" / "run_state.json").read_text())["world_size"] == after

    if stage == 2:
        run = tmp_path / "again"
        cut_at(tmp_path / "ref2", TAG, run)
        ckpts = run / "checkpoints"
        # converted once: a second call (a resume killed before its next checkpoint) reuses the folder
        (ckpts / f".convert-{TAG}-999").mkdir()  # what a conversion killed midway leaves
        name = elastic.convert_to_universal(ckpts, TAG)
        assert name == f"{TAG}_universal" and (ckpts / name / "zero").is_dir() and not list(ckpts.glob(".convert-*"))
        assert json.loads((ckpts / name / "run_state.json").read_text())["world_size"] == 2
        (ckpts / name / "marker").write_text("")
        assert elastic.convert_to_universal(ckpts, TAG) == name and (ckpts / name / "marker").exists()



def resume_of(world_size=2, windows=4):
    return elastic.Resume(Path("runs/x/checkpoints"), TAG, {"step": 3, "world_size": world_size, "global_batch_windows": windows})


@pytest.mark.parametrize("flags, world, msg", [
    (["--micro-batch", "3"], 1, "resuming step_00000003 (written with 4 windows per step) on 1 rank(s): --global-batch-tokens 1024 "
                                "is not a multiple"),
    (["--micro-batch", "2"], 3, "micro batch x ranks divides 4"),
    (["--grad-accum", "1"], 1, "trained with 4 windows (1024 tokens) per step; this run would take 2 (micro batch 2 x accumulation "
                               "1 x 1 rank(s)): give --global-batch-tokens 1024"),
    (["--global-batch-tokens", "2048"], 1, "this run would take 8"),
])
def test_a_global_batch_that_cannot_be_kept_is_one_line(flags, world, msg):
    import torch

    from lvm.train.ds_config import ConfigError, load_ds_config
    from lvm.train.options import parse_options

    opts, given = parse_options(["--seq-len", "256", "--micro-batch", "2", *flags])
    resume = resume_of()
    given = elastic.keep_global_batch(opts, given, resume)
    with pytest.raises(ConfigError) as e:
        elastic.resolve_keeping_batch(load_ds_config("ds_configs/zero2.json"), opts, given, world, torch.device("cpu"), resume)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_the_checkpoint_global_batch_sets_the_accumulation():
    import torch

    from lvm.train.ds_config import load_ds_config
    from lvm.train.options import parse_options

    for world, accum in ((1, 4), (2, 2), (4, 1)):
        opts, given = parse_options(["--seq-len", "256", "--micro-batch", "1"])
        given = elastic.keep_global_batch(opts, given, resume_of())
        ds = elastic.resolve_keeping_batch(load_ds_config("ds_configs/zero3.json"), opts, given, world, torch.device("cpu"), resume_of())
        assert (opts.grad_accum, ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (accum, accum, 4)
