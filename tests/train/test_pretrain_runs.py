"""Real DeepSpeed runs on CPU (gloo), 2 ranks where distribution matters."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train.conftest import ENV, REPO, base_args, read_metrics, run_train, train_cmd


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("stage", [2, 3])
def test_loss_falls_with_two_ranks(train_shards, tmp_path, stage):
    run = tmp_path / f"z{stage}"
    # ZeRO-3 with activation checkpointing and whole-sentence packing (position_ids restart per sentence)
    extra = ["--grad-ckpt", "--packing", "sentence"] if stage == 3 else []
    r = run_train(2, base_args(train_shards, run, "--ds_config", f"ds_configs/zero{stage}.json", "--max-steps", "30",
                               "--eval-every", "30", "--save-every", "10", "--keep-last", "2", *extra))
    m = read_metrics(run)
    losses = [m[s]["loss"] for s in sorted(m)]
    assert len(losses) == 30
    assert mean(losses[-5:]) < mean(losses[:5]) - 0.2, losses
    assert f"ZeRO-{stage}" in r.stdout and "world 2" in r.stdout
    assert all(k in m[1] for k in ("step", "loss", "lr", "tokens_per_s", "grad_norm"))
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert val and "perplexity" in val[-1] and any(k.startswith("perplexity/") for k in val[-1])
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000020", "step_00000030"]


def test_logged_loss_is_cross_entropy_over_every_position(train_shards, tmp_path):
    """A real run's step-1 loss is the cross-entropy, under the initial weights, of all seq_len targets of each
    window of its micro-batch: a window's inputs shifted by one, then the first input of the next window."""
    import numpy as np
    import torch.nn.functional as F
    from transformers import LlamaConfig

    from lvm.data.mixture import DistributedLoader
    from lvm.train.data_setup import build_windows, open_data
    from lvm.train.engine import build_model

    run = tmp_path / "one"
    run_train(1, base_args(train_shards, run, "--ds_config", "ds_configs/zero2.json", "--max-steps", "3", "--save-every", "100"))
    logged = read_metrics(run)[1]["loss"]

    sources, _ = open_data(str(train_shards))
    windows = build_windows(sources, 256, "concat", 0, None)
    batch = DistributedLoader(windows, 2).next_batch()  # rank 0's first micro-batch: global windows 0 and 1
    w = windows.sources[0]
    want = []
    for g in range(2):
        p = w.read_position(0, g)
        assert p + 1 < w.per_epoch
        want.append(np.concatenate([w.window_at(0, p)[0][1:], w.window_at(0, p + 1)[0][:1]]))
    want = torch.from_numpy(np.stack(want))
    torch.manual_seed(0)  # the run's --seed: the same initial weights
    model, _ = build_model(LlamaConfig.from_json_file(run / "model_config.json"), json.loads((run / "ds_config.json").read_text()),
                           False, "sdpa")
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, use_cache=False).logits.float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), want.reshape(-1), reduction="none").view(2, 256)
    assert abs(logged - nll.mean().item()) < 1e-5, (logged, nll.mean().item())
    assert abs(logged - nll[:, :-1].mean().item()) > 1e-5  # not the seq_len - 1 targets of unshifted labels


def test_mixture_resume_equals_uninterrupted_and_survives_sigkill(train_shards, second_source, tmp_path):
    """Two weighted sources: resume (from a checkpoint, and after SIGKILL) continues the exact stream."""
    sources = [train_shards, second_source]
    common = ["--ds_config", "ds_configs/zero2.json", "--max-steps", "12", "--keep-last", "10",
              "--data-weights", "0.7", "0.3", "--eval-every", "12"]
    full = tmp_path / "full"
    run_train(2, base_args(sources, full, *common, "--save-every", "4"))
    ref = read_metrics(full)
    per_step = 2 * 2 * 256  # micro batch x ranks x seq
    for s, row in ref.items():
        drawn = row["tokens_by_source"]
        assert set(drawn) == {"shards", "laion"} and sum(drawn.values()) == s * per_step
        assert "loss/shards" in row and "loss/laion" in row
    assert abs(ref[12]["tokens_by_source"]["laion"] / (12 * per_step) - 0.3) <= 0.03
    val = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert val and {"loss/shards", "loss/laion"} <= set(val[-1])

    def same(got, keys=("loss", "loss/shards", "loss/laion")):
        for s in got:
            assert got[s]["tokens_by_source"] == ref[s]["tokens_by_source"]
            for k in keys:
                assert abs(got[s][k] - ref[s][k]) <= 1e-6, (s, k, got[s][k], ref[s][k])

    resumed = tmp_path / "resumed"
    run_train(2, base_args(sources, resumed, *common, "--save-every", "4",
                           "--resume", str(full / "checkpoints" / "step_00000004")))
    got = read_metrics(resumed)
    assert sorted(got) == list(range(5, 13))
    same(got)

    # SIGKILL mid-run, then --resume auto continues the exact stream.
    killed = tmp_path / "killed"
    args = base_args(sources, killed, *common, "--save-every", "2")
    proc = subprocess.Popen(train_cmd(2, args), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    latest = killed / "checkpoints" / "latest"
    while time.time() < deadline and not (latest.is_file() and latest.read_text().strip() >= "step_00000004"):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = latest.read_text().strip()
    assert at_kill < "step_00000012", "the kill must land before the end"
    run_train(2, args)
    got = read_metrics(killed)
    assert sorted(got) == list(range(1, 13))
    same(got)
    val_killed = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert abs(val_killed[-1]["loss/laion"] - val[-1]["loss/laion"]) <= 1e-6


def test_sigusr1_saves_and_resume_continues(train_shards, tmp_path):
    run = tmp_path / "pre"
    args = base_args(train_shards, run, "--ds_config", "ds_configs/zero2.json", "--max-steps", "400", "--save-every", "1000")
    proc = subprocess.Popen(train_cmd(1, args), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    tag = (run / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag.split("_")[1])
    assert 3 <= stopped_at < 400 and "stopping on request" in out
    r = run_train(1, args[:-4] + ["--max-steps", str(stopped_at + 2), "--save-every", "1000"], check=False)
    assert "resumed from" in r.stdout and f"at step {stopped_at}" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def located_by_every_spelling(run, hf):
    """`lvm.artifacts.locate` on a real run and its export: every path a user may give names the same things."""
    from lvm.artifacts import CheckpointError, TokenizerRecord, locate

    ckpts = run / "checkpoints"
    for given in (run, ckpts, ckpts / "latest", ckpts / "step_00000003", ckpts / "step_00000003" / "run_state.json"):
        found = locate(given)
        assert (found.run_dir, found.ckpt_dir, found.tag, found.hf_dir) == (run, ckpts, "step_00000003", None), given
        assert found.checkpoint() == (ckpts, "step_00000003") and found.window() == 256
        assert found.tokenizer().compatible(TokenizerRecord.from_file(run / "tokenizer.json"))
    exported = locate(hf)
    assert (exported.hf_dir, exported.run_dir, exported.tag, exported.window()) == (hf, None, None, 256)
    assert exported.tokenizer_info() == json.loads((run / "tokenizer.json").read_text())
    with pytest.raises(CheckpointError, match="--resume .*Hugging Face model folder"):
        locate(hf, "--resume").checkpoint()


@pytest.mark.parametrize("stage", [2, 3])
def test_export_matches_engine_logits(train_shards, tmp_path, stage):
    """The exported HF folder gives the logits of the DeepSpeed engine that wrote the checkpoint."""
    from transformers import LlamaForCausalLM

    run = tmp_path / "run"
    run_train(1, base_args(train_shards, run, "--ds_config", f"ds_configs/zero{stage}.json", "--max-steps", "3",
                           "--save-every", "3"))
    probe = tmp_path / "probe.pt"
    code = f"""
import os, torch, deepspeed, json
os.environ.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT='{29700 + stage}')
from lvm.train.engine import build_model, param_groups
from transformers import LlamaConfig
deepspeed.init_distributed(dist_backend='gloo')
ds = json.load(open('{run}/ds_config.json'))
cfg = LlamaConfig.from_json_file('{run}/model_config.json')
model, keep = build_model(cfg, ds, False)
engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds)
engine.load_checkpoint('{run}/checkpoints')
engine.eval()
ids = torch.arange(40).view(2, 20) * 97 % 8192
with torch.no_grad():
    torch.save(engine(input_ids=ids).logits, '{probe}')
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=ENV, capture_output=True, timeout=300)
    hf = tmp_path / "hf"
    r = subprocess.run([sys.executable, "launch/export_hf.py", "--checkpoint", str(run), "--out", str(hf)],
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    located_by_every_spelling(run, hf)
    model = LlamaForCausalLM.from_pretrained(hf).eval()
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (8192, 8193, 8194)
    ids = torch.arange(40).view(2, 20) * 97 % 8192
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.allclose(logits, torch.load(probe), atol=1e-5)
