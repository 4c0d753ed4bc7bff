"""--init-from: start pretraining from a Hugging Face LlamaForCausalLM folder in LVM's released layout."""

import json
import subprocess
import sys

import pytest
import torch

from lvm.train import init_from
from lvm.train.export import load_fp32_model
from lvm.train.options import parse_options
from tests.train.conftest import ENV, PRETRAIN, REPO, base_args
from tests.train.one_rank import run_train_any as run_train

TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def lvm_like_folder(path, vocab=8292, fmt="safetensors", dtype=torch.bfloat16, seed=3, **over):
    """A tiny random model saved as LVM released its 7B: vocab 8292, LLaMA's bos/eos 1/2, bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, **{**TINY, **over})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    if fmt == "safetensors":
        model.save_pretrained(path)
    else:  # the older layout: pytorch_model.bin (read with weights_only)
        path.mkdir(parents=True)
        cfg.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return {k: v.float() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def lvm_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("lvm") / "lvm-tiny"
    return d, lvm_like_folder(d)


def assert_same_weights(run, want):
    model = load_fp32_model(run)
    got = model.state_dict()
    assert set(want) <= set(got)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_zero3_two_ranks_start_from_lvm_layout(train_shards, lvm_folder, tmp_path):
    folder, weights = lvm_folder
    run = tmp_path / "run"
    # --lr 0: AdamW leaves the weights exactly as loaded, so the checkpoint shows what was loaded
    r = run_train(2, base_args(train_shards, run, "--ds_config", "ds_configs/zero3.json", "--init-from", str(folder),
                               "--lr", "0", "--min-lr", "0", "--warmup-steps", "1", "--max-steps", "2",
                               "--save-every", "2"))
    assert "initialised from" in r.stdout and "ZeRO-3" in r.stdout and "world 2" in r.stdout
    assert "vocab 8292" in r.stdout
    cfg = json.loads((run / "model_config.json").read_text())
    assert cfg["vocab_size"] == 8292 and cfg["hidden_size"] == 64
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (8192, 8193, 8194)  # not LLaMA's 1/2
    assert_same_weights(run, weights)
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_zero2_pytorch_bin_with_model_given_then_resume_wins(train_shards, tmp_path):
    folder = tmp_path / "bin-model"
    weights = lvm_like_folder(folder, fmt="bin", dtype=torch.float32, seed=5)
    run = tmp_path / "run"
    args = base_args(train_shards, run, "--ds_config", "ds_configs/zero2.json", "--model", "tiny", "--init-from", str(folder),
                     "--lr", "0", "--min-lr", "0", "--warmup-steps", "0", "--max-steps", "1", "--save-every", "1")
    r = run_train(1, args)
    assert "initialised from" in r.stdout
    assert_same_weights(run, weights)
    # the job's command again, with more steps: the checkpoint, not the folder, is where it continues
    r = run_train(1, [*args, "--max-steps", "2"])
    assert "resumed from" in r.stdout and "initialised from" not in r.stdout


def opts_for(*argv):
    return parse_options(["--seq-len", "256", *argv])


def test_bad_folders_are_one_line_errors(tmp_path):
    small = tmp_path / "small-vocab"
    lvm_like_folder(small, vocab=8000)
    with pytest.raises(init_from.InitError, match=r"vocab_size 8000 < 8195"):
        init_from.model_config(*opts_for("--init-from", str(small)))

    misfit = tmp_path / "misfit"
    lvm_like_folder(misfit)
    cfg = json.loads((misfit / "config.json").read_text())
    (misfit / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 200}))
    with pytest.raises(init_from.InitError, match=r"do not fit its config.json: model.layers.0.mlp.gate_proj.weight is "
                                                   r"\[176, 64\], the config makes it \[200, 64\]"):
        init_from.model_config(*opts_for("--init-from", str(misfit)))

    missing = tmp_path / "missing"
    lvm_like_folder(missing)
    from safetensors.torch import load_file, save_file

    sd = load_file(missing / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, missing / "model.safetensors")
    with pytest.raises(init_from.InitError, match=r"1 tensor\(s\) missing, e.g. lm_head.weight"):
        init_from.model_config(*opts_for("--init-from", str(missing)))

    (tmp_path / "empty").mkdir()
    with pytest.raises(init_from.InitError, match="no config.json"):
        init_from.model_config(*opts_for("--init-from", str(tmp_path / "empty")))
    nofiles = tmp_path / "nofiles"
    nofiles.mkdir()
    (nofiles / "config.json").write_text((misfit / "config.json").read_text())
    with pytest.raises(init_from.InitError, match="no model.safetensors or pytorch_model.bin"):
        init_from.model_config(*opts_for("--init-from", str(nofiles)))
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(init_from.InitError, match="model_type 'gpt2'"):
        init_from.model_config(*opts_for("--init-from", str(gpt)))


def test_model_flag_must_agree_and_may_be_omitted(lvm_folder):
    folder, _ = lvm_folder
    opts, given = opts_for("--init-from", str(folder))
    cfg = init_from.model_config(opts, given)
    assert cfg.vocab_size == 8292 and (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (8192, 8193, 8194)
    assert cfg.max_position_embeddings == 4096  # the folder's, at least the window
    assert opts.model == str(folder / "config.json") and opts.run_dir() == "runs/lvm-tiny-s256"
    with pytest.raises(init_from.InitError, match=r"--model 100m and --init-from .* disagree \(hidden_size 640 there, 64"):
        init_from.model_config(*opts_for("--init-from", str(folder), "--model", "100m"))


def test_cli_error_is_one_line_before_compute(train_shards, tmp_path):
    small = tmp_path / "small"
    lvm_like_folder(small, vocab=8100)
    r = subprocess.run([sys.executable, PRETRAIN, *base_args(train_shards, tmp_path / "run", "--init-from", str(small))],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --init-from") and "vocab_size 8100 < 8195" in r.stderr
    assert not (tmp_path / "run").exists()
