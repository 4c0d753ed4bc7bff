"""--optimizer reaches DeepSpeed through the launcher (real engine, one CPU process)."""

from tests.train.conftest import base_args, read_metrics, run_train


def test_pretrain_with_sgd_and_a_refusal_for_8bit_on_cpu(train_shards, tmp_path):
    run = tmp_path / "sgd"
    r = run_train(1, base_args(train_shards, run, "--max-steps", "3", "--optimizer", "sgd", "--lr", "1e-2",
                               "--ds_config", "ds_configs/zero2.json"))
    rows = read_metrics(run)
    assert sorted(rows) == [1, 2, 3] and all(rows[s]["loss"] > 0 for s in rows), r.stdout[-2000:]
    assert '"type": "auto"' not in (run / "ds_config.json").read_text()
    bad = run_train(1, base_args(train_shards, tmp_path / "bnb", "--max-steps", "3", "--optimizer", "adamw8bit",
                                 "--ds_config", "ds_configs/zero3_offload.json"), check=False)
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and ("bitsandbytes" in last or "zero_force_ds_cpu_optimizer" in last), bad.stderr[-2000:]
    assert not (tmp_path / "bnb" / "metrics.jsonl").exists()
