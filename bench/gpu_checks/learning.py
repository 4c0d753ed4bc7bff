"""Steps 4 and 5: make demo's learning proof scaled to the GPU, evaluation and generation with its model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

try:
    import numpy as np
except ImportError:  # reported by no_gpu_reason with the rest of what is missing
    np = None

from gpu_checks.data import prompt_frames
from gpu_checks.procs import free_port, run
from gpu_checks.report import Report, Sizes


def step_learn_eval_generate(rep: Report, out: Path, sz: Sizes, shards: Path, manifest: Path, cuda: bool) -> None:
    """The demo's learning proof with the demo's recipe scaled to the GPU (`lvm.eval.learning.GPU_RECIPE`): train,
    evaluate the context curve, generate the next frame of a held-out clip with and without its first frames; the
    demo's checks are asserted (with --smoke they are reported only: a few CPU steps learn nothing)."""
    import shutil

    import torch

    recipe = sz.learn
    run_dir = out / "runs" / "learn"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "launch/pretrain.py", *recipe.pretrain_flags(str(shards), str(run_dir)), "--resume", "none",
           "--precision", sz.precision]
    rc, dt, p = run(cmd, out / "logs" / "learn.log", timeout=900, env={"MASTER_PORT": str(free_port())})
    rows = [r for r in read_rows(run_dir / "metrics.jsonl") if r.get("split") == "train" and r.get("loss") is not None]
    if rc != 0 or not rows:
        rep.fail("5 learning", f"{recipe.model} training", p.tail())
        return
    tps = [r["tokens_per_s"] for r in rows[1:]] or [rows[-1]["tokens_per_s"]]
    rep.row("5 learning", f"{recipe.model} on the video corpus: the demo's recipe, seq {recipe.seq_len}, micro {recipe.micro_batch}, "
            f"lr {recipe.lr:g} cosine to {recipe.lr * recipe.final_lr_ratio:g}", f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}",
            f"{rows[-1]['step']} steps in {dt:.0f} s ({np.median(tps):,.0f} tok/s)")
    rep.data["learning"] = {"train": [(r["step"], r["loss"]) for r in rows], "seconds": dt}

    ev = out / "eval"
    rc, dt, pe = run([sys.executable, "launch/evaluate.py", "--checkpoint", str(run_dir), "--data", str(shards), "--split", "val",
                      "--out", str(ev), "--batch-size", "8" if cuda else "2"], out / "logs" / "evaluate.log", timeout=600)
    if rc != 0 or not (ev / "eval.json").is_file():
        rep.fail("4 eval", "launch/evaluate.py", pe.tail())
        return
    res = json.loads((ev / "eval.json").read_text())
    rep.row("4 eval", "launch/evaluate.py (held-out videos, 1 process)", f"{dt:.1f} s",
            f"perplexity {res['perplexity']:.1f} over {res['tokens']:,} tokens")
    if cuda and torch.cuda.device_count() >= 2:
        ev2 = out / "eval_2proc"
        rc, dt, p2 = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                          "launch/evaluate.py", "--checkpoint", str(run_dir), "--data", str(shards), "--split", "val",
                          "--out", str(ev2), "--batch-size", "8"], out / "logs" / "evaluate_2proc.log", timeout=600)
        if rc != 0 or not (ev2 / "eval.json").is_file():
            rep.fail("4 eval", "evaluate.py under torchrun, 2 processes", p2.tail())
        else:
            two = json.loads((ev2 / "eval.json").read_text())
            same = abs(two["perplexity"] / res["perplexity"] - 1) < 1e-3
            rep.row("4 eval", "launch/evaluate.py under torchrun, 2 GPUs", f"{dt:.1f} s",
                    f"perplexity {two['perplexity']:.2f} ({'equals' if same else 'DIFFERS from'} 1 process)")
    else:
        rep.row("4 eval", "launch/evaluate.py under torchrun, 2 GPUs", "n/a", "one GPU here")
    psnr = generate_with_and_without_prompt(rep, out, run_dir, shards, manifest)
    learning_verdict(rep, rows, res, shards, psnr, asserted=cuda)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def generate_with_and_without_prompt(rep: Report, out: Path, run_dir: Path, shards: Path, manifest: Path) -> tuple | None:
    """Frame PROMPT_FRAMES+1 of a held-out clip generated from its first frames and from nothing (the demo's
    sampling); (prompted, unprompted) PSNR against the tokenized truth, or None."""
    from lvm.eval.learning import PROMPT_FRAMES

    prompt = prompt_frames(shards, manifest, out / "prompt", n=PROMPT_FRAMES + 1)
    if prompt is None or len(prompt) <= PROMPT_FRAMES:
        rep.fail("4 generate", "prompt frames", f"no held-out video of more than {PROMPT_FRAMES} frames to prompt with")
        return None
    sampling = ["--seed", "0", "--temperature", "1.0", "--top-k", "100", "--num-samples", "4", "--truth", str(prompt[-1])]
    psnr = []
    for name, given in (("generated", ["--prompt", *map(str, prompt[:-1])]), ("generated_unprompted", ["--unconditional"])):
        gen = out / name
        rc, dt, pg = run([sys.executable, "launch/generate.py", "--checkpoint", str(run_dir), *given, "--out", str(gen), *sampling],
                         out / "logs" / f"{name}.log", timeout=600)
        if rc != 0 or not (gen / "generation.json").is_file():
            rep.fail("4 generate", f"launch/generate.py ({name})", pg.tail())
            return None
        psnr.append(json.loads((gen / "generation.json").read_text())["psnr_tokenized_truth"])
        rep.row("4 generate", f"launch/generate.py: frame {PROMPT_FRAMES + 1} of a held-out video, "
                + (f"from {PROMPT_FRAMES} frames" if given[0] == "--prompt" else "unprompted"), f"{dt:.1f} s",
                f"{gen / 'grid.png'}, 4 samples (includes loading the model and the tokenizer)")
    return tuple(psnr)


def learning_verdict(rep: Report, train_rows: list[dict], eval_result: dict, shards: Path, psnr: tuple | None,
                     asserted: bool) -> None:
    """The demo's checks (`lvm.eval.learning`), one row each; a failed check fails the step where `asserted`."""
    from lvm.data.shards.shard_set import load_sentences
    from lvm.eval.learning import final_loss, generation_check, learning_checks
    from lvm.eval.perplexity import unigram_entropy

    curve = {int(k): v for k, v in eval_result["perplexity_by_context_frames"].items()}
    rep.data["learning"]["perplexity_by_context_frames"] = curve
    if curve:
        rep.row("5 learning", "held-out next-frame perplexity vs context frames",
                ", ".join(f"{k}: {curve[k]:.1f}" for k in sorted(curve)), "paper: 62.1 -> 48.4 from 1 to 11 frames")
    final, _ = final_loss(train_rows)
    checks = learning_checks(final, unigram_entropy(load_sentences(shards / "train")), curve)
    if psnr is not None:
        checks.append(generation_check(*psnr))
    rep.data["learning"]["checks"] = [c._asdict() for c in checks]
    for c in checks:
        if c.ok or not asserted:
            rep.row("5 learning", c.what, "yes" if c.ok else "no", "" if asserted else "--smoke: reported, not asserted")
        else:
            rep.fail("5 learning", c.what, "the demo's learning check failed on the GPU")
