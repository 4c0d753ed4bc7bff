"""Bad inputs stop the run before any compute, with a one-line error naming the culprit."""

import json
import shutil

import numpy as np
import pytest

from lvm.data.shards.format import read_shard, write_shard
from tests.train.conftest import base_args, run_train


def one_line_error(r) -> str:
    assert r.returncode != 0
    err = [x for x in r.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(err) == 1, r.stderr[-3000:]
    return err[0]


@pytest.fixture()
def shards_copy(train_shards, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(train_shards, dst)
    return dst


def test_token_ids_beyond_codebook(shards_copy, tmp_path):
    write_shard(shards_copy / "train" / "train-99999.arrow",
                [{"tokens": np.full(256, 9000, np.uint16), "n_images": 1, "kind": "image", "id": "bad"}])
    err = one_line_error(run_train(1, base_args(shards_copy, tmp_path / "r"), check=False))
    assert "train-99999.arrow" in err and "9000" in err


def test_corrupt_arrow_file(shards_copy, tmp_path):
    f = sorted((shards_copy / "train").glob("*.arrow"))[0]
    f.write_bytes(f.read_bytes()[:100])
    err = one_line_error(run_train(1, base_args(shards_copy, tmp_path / "r"), check=False))
    assert f.name in err


def test_other_tokenizer_between_train_and_val(shards_copy, tmp_path):
    info = json.loads((shards_copy / "tokenizer.json").read_text())
    (shards_copy / "val" / "tokenizer.json").write_text(json.dumps({**info, "spec": "vqgan:/elsewhere"}))
    err = one_line_error(run_train(1, base_args(shards_copy, tmp_path / "r"), check=False))
    assert "same tokenizer" in err


def test_missing_and_empty_folders(tmp_path):
    err = one_line_error(run_train(1, base_args(tmp_path / "nope", tmp_path / "r"), check=False))
    assert "nope" in err
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "tokenizer.json").write_text(json.dumps({"spec": "patch-kmeans:x", "codebook_size": 8192, "tokens_per_image": 256}))
    err = one_line_error(run_train(1, base_args(tmp_path / "empty", tmp_path / "r"), check=False))
    assert "no *.arrow" in err


def test_flag_contradicting_ds_config(train_shards, tmp_path):
    cfg = json.loads(open("ds_configs/zero2.json").read())
    cfg["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    err = one_line_error(run_train(1, base_args(train_shards, tmp_path / "r", "--ds_config", str(tmp_path / "ds.json")), check=False))
    assert "train_micro_batch_size_per_gpu=4" in err and "--micro-batch 2" in err


def test_checkpoints_of_another_run_shape_are_refused(train_shards, tmp_path):
    run = tmp_path / "r"
    run_train(1, base_args(train_shards, run, "--ds_config", "ds_configs/zero2.json", "--max-steps", "1", "--save-every", "1",
                           "--warmup-steps", "0"))
    err = one_line_error(run_train(1, base_args(train_shards, run, "--ds_config", "ds_configs/zero3.json", "--max-steps", "2",
                                                 "--warmup-steps", "0"), check=False))
    assert "zero_stage" in err


def test_non_finite_losses_skip_updates_then_stop(train_shards, tmp_path):
    """rope_theta 0 makes RoPE frequencies infinite: every loss is NaN from the first step."""
    bad = tmp_path / "nan_model.json"
    bad.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "rope_theta": 0.0}))
    run = tmp_path / "r"
    r = run_train(1, base_args(train_shards, run, "--model", str(bad), "--ds_config", "ds_configs/zero2.json",
                               "--max-steps", "20", "--max-bad-steps", "3"), check=False)
    err = one_line_error(r)
    assert "3 consecutive steps" in err
    assert r.stdout.count("update skipped") == 3
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("loss" not in x for x in rows)  # no made-up loss for a step without a finite one
    assert rows[-1]["skipped_steps"] == 2


def test_mixture_inputs_are_checked_before_compute(train_shards, second_source, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(second_source, other)
    info = json.loads((other / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps({**info, "spec": "vqgan:/elsewhere"}))
    err = one_line_error(run_train(1, base_args([train_shards, other], tmp_path / "r"), check=False))
    assert "source other" in err and "same tokenizer" in err
    for data, extra, want in (
        ([train_shards, second_source], ["--data-weights", "1", "0"], "must be positive numbers, got 0.0"),
        ([train_shards, second_source], ["--data-weights", "1"], "has 1 values for 2 --data sources"),
        ([train_shards, tmp_path / "nope"], [], "nope does not exist"),
        ([train_shards, train_shards], [], "twice"),
    ):
        r = run_train(1, base_args(data, tmp_path / "r", *extra), check=False)
        assert want in one_line_error(r)
        assert not (tmp_path / "r").exists()  # stopped before anything was written


def test_verify_data_reads_every_token(second_source, tmp_path):
    src = tmp_path / "laion"
    shutil.copytree(second_source, src)
    f = sorted((src / "train").glob("*.arrow"))[1]
    first = read_shard(f).column("tokens")[0].values.to_numpy()[:8].tobytes()
    data = f.read_bytes()
    at = data.find(first)
    f.write_bytes(data[:at] + np.array([8500], np.uint16).tobytes() + data[at + 2 :])  # same size, counts as recorded
    err = one_line_error(run_train(1, base_args(src, tmp_path / "r", "--verify-data"), check=False))
    assert f.name in err and "max_token 8500" in err
