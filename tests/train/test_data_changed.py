"""A corpus that grew between a checkpoint and its resume: refused before any compute, in one line naming
--data-changed, or continued with `--data-changed continue` (step, optimizer and schedule kept; a new epoch
layout over the data as it is now)."""

import shutil

import pytest

from lvm.data.mixture import DistributedLoader, MixtureWindows
from lvm.data.shards.format import read_shard, write_shard
from lvm.data.shards.shard_set import open_shards
from lvm.data.windows.source import SourceWindows
from tests.train.conftest import base_args, read_metrics, run_train


def add_shard(train_dir, name="zz-added-00000.arrow"):
    """A new shard in the folder (not in index.json: read from its own metadata): a copy of the first, other ids."""
    src = sorted(train_dir.glob("*.arrow"))[0]
    t = read_shard(src)
    rows = [{"tokens": r["tokens"], "n_images": r["n_images"], "kind": r["kind"], "id": f"added-{r['id']}"}
            for r in t.to_pylist()]
    write_shard(train_dir / name, rows)


def test_loader_refuses_or_continues_on_a_new_layout(train_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(train_shards, data)
    before = MixtureWindows([SourceWindows(open_shards(data / "train"), 256, "concat", 0)], ["data"])
    old = DistributedLoader(before, 2)
    for _ in range(before.sources[0].per_epoch // 4 + 1):  # 2 windows each: into the second half of epoch 0
        old.next_batch()
    state = old.state_dict()
    add_shard(data / "train")
    after = MixtureWindows([SourceWindows(open_shards(data / "train"), 256, "concat", 0)], ["data"])
    with pytest.raises(ValueError, match=r"data changed since the checkpoint \(data: \d+ -> \d+ shards.*--data-changed continue"):
        DistributedLoader(after, 2).load_state_dict(state)
    new = DistributedLoader(after, 2)
    line = new.load_state_dict(state, "continue")
    assert "--data-changed continue" in line and "data epoch 1" in line and "\n" not in line
    assert new.windows_consumed == old.windows_consumed and new.epoch == 1.0
    src = after.sources[0]
    got = new.next_batch()  # the first windows of epoch 1 of the new layout
    assert (got.input_ids[0].numpy() == src.window(src.per_epoch)[0]).all()
    assert new.tokens_by_source()["data"] == (old.windows_consumed + 2) * 256
    again = DistributedLoader(after, 2)  # a later resume on the same data continues that layout, as it is
    assert again.load_state_dict(new.state_dict()) is None
    assert (again.next_batch().input_ids[0].numpy() == src.window(src.per_epoch + 2)[0]).all()


def test_resume_on_a_corpus_that_grew(train_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(train_shards, data)
    run = tmp_path / "run"
    args = base_args(data, run, "--ds_config", "ds_configs/zero2.json", "--save-every", "100")
    run_train(1, [*args, "--max-steps", "3"])
    add_shard(data / "train")

    r = run_train(1, [*args, "--max-steps", "5"], check=False)
    assert r.returncode != 0
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "the data changed since" in errors[0] and "step_00000003" in errors[0] and "--data-changed continue" in errors[0]
    assert "shards" in errors[0]
    # refused before any compute: no model line, no engine, no checkpoint loaded
    assert "parameters" not in r.stdout and "resumed from" not in r.stdout and "DeepSpeed" not in r.stdout + r.stderr

    r = run_train(1, [*args, "--max-steps", "5", "--data-changed", "continue"])
    lines = [x for x in r.stdout.splitlines() if "--data-changed continue" in x]
    assert len(lines) == 1 and "data changed since the checkpoint" in lines[0] and "epoch" in lines[0], r.stdout[-3000:]
    assert "resumed from" in r.stdout and "at step 3" in r.stdout
    assert sorted(read_metrics(run)) == [1, 2, 3, 4, 5]
