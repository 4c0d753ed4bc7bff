import json

import pytest

from lvm.train.checkpoint import CheckpointError, check_run_identity


def identity(version: str, hidden: int = 64, seq: int = 256) -> dict:
    return {"world_size": 2, "zero_stage": 2, "seq_len": seq, "packing": "concat",
            "model": {"hidden_size": hidden, "transformers_version": version}}


def test_a_library_upgrade_is_not_another_run(tmp_path):
    check_run_identity(tmp_path, identity("4.50.0"), write=True)
    assert "transformers_version" not in json.loads((tmp_path / "run.json").read_text())["model"]
    check_run_identity(tmp_path, identity("5.1.0"), write=False)  # accepted


@pytest.mark.parametrize("other", [identity("4.50.0", hidden=128), identity("4.50.0", seq=512)])
def test_another_model_or_seq_len_is_refused(tmp_path, other):
    check_run_identity(tmp_path, identity("4.50.0"), write=True)
    with pytest.raises(CheckpointError, match="another run"):
        check_run_identity(tmp_path, other, write=False)


def test_world_size_and_micro_batch_are_not_the_run(tmp_path):
    """A record of an older version (world size, micro batch in it) accepts the run on another world size."""
    old = {**identity("4.50.0"), "world_size": 8, "micro_batch": 4}
    (tmp_path / "run.json").write_text(json.dumps(old))
    now = {k: v for k, v in identity("5.1.0").items() if k != "world_size"}
    check_run_identity(tmp_path, now, write=True)
    # a key the old record lacks is not a difference, and the record is completed
    check_run_identity(tmp_path, {**now, "zero_stage": 2, "extra": 1}, write=True)
    assert json.loads((tmp_path / "run.json").read_text())["extra"] == 1
    with pytest.raises(CheckpointError, match="extra: 1 there, 2 here"):
        check_run_identity(tmp_path, {**now, "extra": 2}, write=False)


def test_prune_keeps_tags_and_drops_stale_universal_copies(tmp_path):
    from lvm.train.checkpoint import prune, read_run_state, write_run_state

    for s in (1, 2, 3):
        (tmp_path / f"step_{s:08d}").mkdir()
    (tmp_path / "step_00000001_universal").mkdir()
    (tmp_path / "step_00000003_universal").mkdir()
    (tmp_path / "latest").write_text("step_00000003")
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000002", "step_00000003",
                                                                       "step_00000003_universal"]
    write_run_state(tmp_path / "step_00000004", {"step": 4, "world_size": 2})
    (tmp_path / "latest").write_text("step_00000004")
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000003", "step_00000004"]
    assert read_run_state(tmp_path, "step_00000004") == {"step": 4, "world_size": 2}
    for r in range(3):  # a tag from before run_state.json: its ZeRO partitions tell the world size
        (tmp_path / "step_00000003" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert read_run_state(tmp_path, "step_00000003") == {"world_size": 3}
