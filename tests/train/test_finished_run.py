"""A finished run started again writes nothing: its newest checkpoint is never rewritten in place (a kill
during such a rewrite would destroy it). Real DeepSpeed on CPU (gloo), one rank."""

import hashlib

from tests.train.conftest import base_args, run_train


def snapshot(folder):
    """Every file under `folder`: (mtime in ns, sha256 of its bytes)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_started_again_writes_nothing(train_shards, tmp_path):
    run = tmp_path / "run"
    args = base_args(train_shards, run, "--ds_config", "ds_configs/zero2.json", "--save-every", "100", "--keep-last", "5",
                     "--decay-steps", "10")
    run_train(1, [*args, "--max-steps", "2"])
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    before = snapshot(run)
    assert any(k.startswith("checkpoints/step_00000002/") and k.endswith("_model_states.pt") for k in before)

    again = run_train(1, [*args, "--max-steps", "2"])
    said = [x for x in again.stdout.splitlines() if "already finished" in x]
    assert len(said) == 1 and "step 2" in said[0], again.stdout[-3000:]
    assert "resumed from" not in again.stdout and "saved checkpoint" not in again.stdout
    assert snapshot(run) == before  # not one file of the run rewritten, touched or added

    more = run_train(1, [*args, "--max-steps", "3"])  # more steps asked: the run goes on, into new tags only
    assert "resumed from" in more.stdout and "saved checkpoint" in more.stdout
    assert (ckpts / "latest").read_text().strip() == "step_00000003"
    after = snapshot(run)
    old_tag = {k: v for k, v in before.items() if k.startswith("checkpoints/step_00000002/")}
    assert {k: after.get(k) for k in old_tag} == old_tag
