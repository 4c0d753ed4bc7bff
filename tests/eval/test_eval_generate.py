"""Evaluation and generation on a real (tiny) trained checkpoint and its HF export."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lvm.data.shards.shard_set import load_sentences
from lvm.eval.generate import PromptError, Sampling, fit_prompt, sample_codes
from lvm.model.vocab import BOS_ID, CODEBOOK_SIZE, EOS_ID
from tests.conftest import REPO, scene
from tests.eval.conftest import cli
from tests.train.conftest import ENV


def test_perplexity_is_exp_mean_nll(trained, train_shards, tmp_path):
    from transformers import LlamaForCausalLM

    run, hf = trained
    r = cli("evaluate.py", "--checkpoint", run, "--data", train_shards, "--out", tmp_path, "--batch-size", "3")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "eval.json").read_text())
    assert (tmp_path / "context_frames.png").stat().st_size > 1000
    # independent computation: each sentence alone, plain log-softmax, per kind and per context frame
    model = LlamaForCausalLM.from_pretrained(hf).eval()
    table = load_sentences(train_shards / "val")
    nll, n, kinds, frames = 0.0, 0, {}, {}
    for i in range(len(table)):
        full = np.concatenate([[BOS_ID], table.sentence(i).astype(np.int64), [EOS_ID]])
        ids = torch.from_numpy(full[: model.config.max_position_embeddings + 1])[None]  # W inputs, W targets at most
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids[:, :-1]).logits[0].double(), -1)
        tok = -logp.gather(1, ids[0, 1:, None])[:, 0]
        nll += float(tok.sum())
        n += len(tok)
        k = kinds.setdefault(str(table.kinds[i]), [0.0, 0])
        k[0] += float(tok.sum())
        k[1] += len(tok)
        if table.kinds[i] in ("video", "sequence"):
            for j in range(min(int(table.n_images[i]), len(tok) // 256)):
                f = frames.setdefault(str(j), [0.0, 0])
                f[0] += float(tok[j * 256 : (j + 1) * 256].sum())
                f[1] += 256
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    for kind, (s, c) in kinds.items():
        assert res["perplexity_by_kind"][kind] == pytest.approx(math.exp(s / c), rel=1e-4)
    for k, (s, c) in frames.items():
        assert res["perplexity_by_context_frames"][k] == pytest.approx(math.exp(s / c), rel=1e-4)
    assert list(res["perplexity_by_context_frames"])[0] == "0"


def test_evaluate_with_two_ranks_equals_one(trained, train_shards, tmp_path):
    run, _ = trained
    one = cli("evaluate.py", "--checkpoint", run, "--data", train_shards, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29877",
                          "launch/evaluate.py", "--checkpoint", str(run), "--data", str(train_shards), "--out", str(tmp_path / "two")],
                         cwd=REPO, env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    # only rank 0 consolidated the checkpoint; rank 1 got the weights by broadcast
    assert two.stdout.count("consolidated the checkpoint") == 1 and "rank 1: received the weights from rank 0" in two.stdout
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6) and a["tokens"] == b["tokens"]


def test_generation_is_visual_reproducible_and_cache_consistent(trained):
    from transformers import LlamaForCausalLM

    _, hf = trained
    model = LlamaForCausalLM.from_pretrained(hf).eval()
    prompt = torch.randint(0, CODEBOOK_SIZE, (2, 256))
    a = sample_codes(model, prompt, Sampling(n_images=1, temperature=1.0, top_k=None, seed=5, num_samples=2))
    b = sample_codes(model, prompt, Sampling(n_images=1, temperature=1.0, top_k=None, seed=5, num_samples=2))
    assert a.shape == (2, 1, 256) and torch.equal(a, b)
    assert int(a.max()) < CODEBOOK_SIZE and int(a.min()) >= 0
    greedy_cache = sample_codes(model, prompt, Sampling(temperature=0, use_cache=True))
    greedy_nocache = sample_codes(model, prompt, Sampling(temperature=0, use_cache=False))
    assert torch.equal(greedy_cache, greedy_nocache)


def test_prompt_is_cut_from_the_left_by_whole_images():
    codes = torch.arange(5 * 256).view(5, 256) % 8192
    kept, dropped = fit_prompt(codes, window=1024, n_new=1)
    assert dropped == 2 and torch.equal(kept, codes[2:])  # (1024 - 256) // 256 = 3 images kept: 1 + 768 inputs + 255
    with pytest.raises(PromptError):
        fit_prompt(codes, window=1024, n_new=4)
    kept, dropped = fit_prompt(torch.zeros(20, 256, dtype=torch.long), window=4096, n_new=1)
    assert len(kept) == 15  # the paper's 15 context frames before the 16th


def test_generate_cli_writes_images_and_rejects_bad_prompts(trained, tmp_path):
    run, hf = trained
    for i in range(2):
        scene(i).save(tmp_path / f"p{i}.png")
    r = cli("generate.py", "--checkpoint", run, "--prompt", tmp_path / "p0.png", tmp_path / "p1.png", "--out", tmp_path / "g",
            "--n-images", "2", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "g" / "generated_1.png").size == (256, 256)
    assert (tmp_path / "g" / "grid.png").is_file()
    (tmp_path / "prompt.json").write_text(json.dumps(["p0.png", "p1.png"]))
    r2 = cli("generate.py", "--checkpoint", hf, "--prompt-file", tmp_path / "prompt.json", "--out", tmp_path / "g2", "--seed", "1",
             "--n-images", "2")
    assert r2.returncode == 0, r2.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g" / "generated_0.png")), np.asarray(Image.open(tmp_path / "g2" / "generated_0.png")))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "empty_run").mkdir()
    for args in (["--prompt", tmp_path / "missing.png"], ["--prompt", tmp_path / "bad.png"],
                 ["--prompt", tmp_path / "p0.png", "--n-images", "9"]):
        r = cli("generate.py", "--checkpoint", run, *args, "--out", tmp_path / "x")
        errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert r.returncode != 0 and len(errors) == 1, r.stderr[-2000:]
    r = cli("generate.py", "--checkpoint", tmp_path / "empty_run", "--prompt", tmp_path / "p0.png", "--out", tmp_path / "x")
    assert r.returncode != 0 and "error:" in r.stderr and re.search(r"no .*model", r.stderr), r.stderr[-2000:]


def test_generate_unconditional_with_truth_reports_psnr(trained, tmp_path):
    """--unconditional samples from [BOS] alone; --truth adds a grid column and generation.json with the PSNR of each
    sample against the truth as the tokenizer reproduces it and as it is."""
    import torch

    from lvm.eval.generate import psnr

    run, _ = trained
    scene(0).save(tmp_path / "t.png")
    r = cli("generate.py", "--checkpoint", run, "--unconditional", "--truth", tmp_path / "t.png", "--out", tmp_path / "u",
            "--num-samples", "2", "--seed", "1")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "u" / "generation.json").read_text())
    assert rep["prompt_images"] == 0 and len(rep["psnr_tokenized_truth_per_sample"]) == 2
    assert abs(rep["psnr_tokenized_truth"] - sum(rep["psnr_tokenized_truth_per_sample"]) / 2) < 1e-9
    assert 0 < rep["psnr_truth"] < 60 and 0 < rep["psnr_tokenizer"] < 60
    # a row per sample: a bar, the sample, a bar, the truth (no prompt images)
    assert Image.open(tmp_path / "u" / "grid.png").size == (2 * 256 + 1 * 8 + 2 * 3 * 8, 2 * 256 + 8)
    assert psnr(torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.1)) == pytest.approx(20.0)
    r = cli("generate.py", "--checkpoint", run, "--unconditional", "--truth", tmp_path / "t.png", tmp_path / "t.png",
            "--out", tmp_path / "x")
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and "--n-images" in errors[0], r.stderr[-2000:]


def test_evaluate_refuses_shards_of_another_tokenizer(trained, train_shards, tmp_path):
    """Checked before any weights are read: another description, or the same description with other weights."""
    import shutil

    run, hf = trained
    info = json.loads((train_shards / "tokenizer.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(train_shards, other)
    changed = {**info, "details": {**info["details"], "fit_images": info["details"].get("fit_images", 0) + 1}}
    (other / "tokenizer.json").write_text(json.dumps(changed))
    twin = tmp_path / "twin"  # the same description, its own copy of the codebook with other values
    shutil.copytree(train_shards, twin)
    kind, _, path = info["spec"].partition(":")
    source = Path(path) if Path(path).is_absolute() else train_shards / path
    shutil.copytree(source, twin / "tokenizer_copy")
    (twin / "tokenizer.json").write_text(json.dumps({**info, "spec": f"{kind}:tokenizer_copy"}))
    book = next((twin / "tokenizer_copy").glob("*.safetensors"))
    data = bytearray(book.read_bytes())
    data[-8:] = bytes(8)
    book.write_bytes(bytes(data))
    for data_dir in (other, twin):
        for ckpt in (run, hf):
            r = cli("evaluate.py", "--checkpoint", ckpt, "--data", data_dir, "--out", tmp_path / "x")
            errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
            assert r.returncode == 2 and len(errors) == 1 and "tokenizer" in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "x").exists()
    ok = cli("evaluate.py", "--checkpoint", hf, "--data", train_shards, "--out", tmp_path / "y", "--max-sentences", "2")
    assert ok.returncode == 0, ok.stderr[-2000:]
