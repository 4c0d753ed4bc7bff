"""`make demo`: the whole pipeline on a video corpus, on whatever machine this is, ending in a model that learns.

Stages: the demo corpus (generated unless --corpus holds a manifest.jsonl) -> make shards (fitting the embedded
tokenizer) -> train the `demo` model with DeepSpeed -> evaluate (perplexity vs context frames) -> generate the
next frame of a held-out clip with and without its first frames as the prompt. Each stage is the CLI a user
would run. The demo then checks what learning means here and says whether it held:
- the final training loss is at least 2 nats below the unigram entropy of the training tokens;
- held-out next-frame perplexity with 3 context frames is at most half of that with none, and the curve never
  rises (by more than 5%) as frames are added;
- the next frame generated from 3 prompt frames is closer (PSNR) to the truth than one generated from nothing.
It exits 1 when any of them fails. The checks and the recipe live in `lvm.eval.learning` (shared with
`make gpu-check` and the convergence test); docs/learning.md says why each choice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from lvm.eval.learning import CPU_RECIPE, PROMPT_FRAMES, Check, final_loss, generation_check, learning_checks

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = "data/demo_corpus"


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def default_shards(corpus: str) -> str:
    return "data/shards" if Path(corpus) == Path(DEFAULT_CORPUS) else f"data/shards-{Path(corpus).resolve().name}"


def stale_demo_corpus(folder: Path, seed: int) -> bool:
    """The embedded corpus on disk was made with other sizes or another seed (corpus.json says so)."""
    from dataclasses import asdict

    from lvm.data.synth import CorpusSize

    if not folder.exists():
        return False
    try:
        made = json.loads((folder / "corpus.json").read_text())
    except (OSError, json.JSONDecodeError):
        return True
    return made != {"seed": seed, **asdict(CorpusSize())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="a folder with manifest.jsonl (generated when it is the default "
                   "and missing)")
    p.add_argument("--shards", default=None, help="shard folder (default: data/shards, or data/shards-<corpus name>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", default="runs/demo", help="training run folder (replaced: the demo trains from scratch)")
    p.add_argument("--model", default=CPU_RECIPE.model, help="model preset")
    p.add_argument("--steps", type=int, default=CPU_RECIPE.steps, help="training steps")
    p.add_argument("--seq-len", type=int, default=CPU_RECIPE.seq_len, help="window length (4 frames)")
    p.add_argument("--lr", type=float, default=CPU_RECIPE.lr, help="peak learning rate (cosine to a tenth of it)")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (processes) on a CPU machine")
    p.add_argument("--skip-train", action="store_true", help="stop after making shards")
    a = p.parse_args(argv)
    if a.steps < 1 or a.seq_len < 2 * 256 + 2 or a.ranks < 1:
        p.error("--steps and --ranks must be >= 1 and --seq-len >= 514 (two frames)")
    a.shards = a.shards or default_shards(a.corpus)
    py = sys.executable
    manifest = Path(a.corpus) / "manifest.jsonl"
    if Path(a.corpus) == Path(DEFAULT_CORPUS) and stale_demo_corpus(REPO / a.corpus, a.seed):
        print(f"{a.corpus} is not the demo corpus of this version and seed: making it again (and its shards)")
        shutil.rmtree(REPO / a.corpus, ignore_errors=True)
        shutil.rmtree(REPO / a.shards, ignore_errors=True)
    if not (REPO / manifest).is_file():
        if Path(a.corpus) != Path(DEFAULT_CORPUS):
            print(f"error: {manifest} does not exist (--corpus must hold a manifest.jsonl)", file=sys.stderr)
            return 2
        run([py, "data_prep/synth_corpus.py", "--out", a.corpus, "--seed", str(a.seed)])
    run([py, "data_prep/make_shards.py", "--manifest", str(manifest), "--out", a.shards, "--seed", str(a.seed),
         "--workers", "2", "--val-fraction", "0.1"])
    report = json.loads((REPO / a.shards / "report.json").read_text())
    w = report["written"]
    print(f"\nShards are in {a.shards}/ (train/, val/, tokenizer.json, index.json, report.json).\n"
          f"The corpus of {a.corpus} became {w['train']['sentences']} training and {w['val']['sentences']} "
          f"validation visual sentences ({w['train']['images'] + w['val']['images']} images of 256 tokens each, "
          f"{report['bytes_per_image']} bytes per image on disk); {report['skipped_count']} sources were skipped. "
          f"The tokenizer is the embedded patch k-means codebook fitted on this corpus and saved in "
          f"{a.shards}/tokenizer so that tokens can be decoded back to pixels.\n")
    if a.skip_train:
        return 0
    train_s = train(a)
    checks = evaluate(a, train_s) + generate(a)
    print("\nDid it learn?")
    for ok, what in checks:
        print(f"  [{'yes' if ok else 'NO '}] {what}")
    if all(ok for ok, _ in checks):
        print("The model learned the frame-to-frame structure of the corpus.")
        return 0
    print("The model did not learn what the demo expects: see docs/learning.md for what sets it.", file=sys.stderr)
    return 1


def train(a) -> float:
    import torch

    ranks = torch.cuda.device_count() or a.ranks
    if (REPO / a.run).exists():
        print(f"removing the previous demo run {a.run}")
        shutil.rmtree(REPO / a.run)
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    t0 = time.perf_counter()
    recipe = replace(CPU_RECIPE, model=a.model, steps=a.steps, seq_len=a.seq_len, lr=a.lr)
    run([deepspeed, "--num_gpus", str(ranks), "--master_port", "29561", "launch/pretrain.py",
         *recipe.pretrain_flags(a.shards, a.run, a.seed)])
    return time.perf_counter() - t0


def evaluate(a, train_s: float) -> list[Check]:
    """Perplexity vs context on the held-out sentences, the loss curve, and the learning checks they carry."""
    from lvm.data.shards.shard_set import load_sentences
    from lvm.eval.perplexity import unigram_entropy
    from lvm.train.metrics import plot_losses, read_metrics

    py = sys.executable
    run_dir = REPO / a.run
    out = Path(a.run) / "eval"
    run([py, "launch/evaluate.py", "--checkpoint", a.run, "--data", a.shards, "--split", "val", "--out", str(out)])
    res = json.loads((REPO / out / "eval.json").read_text())
    unigram = unigram_entropy(load_sentences(REPO / a.shards / "train"))
    train_rows = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    final, n_last = final_loss(train_rows)
    plot_losses(run_dir, run_dir / "loss.png", reference=unigram, wall_s=train_s)
    print(f"\nTraining took {train_s / 60:.1f} min. Training loss {train_rows[0]['loss']:.3f} (step {train_rows[0]['step']}) "
          f"-> {final:.3f} (mean of the last {n_last} logged steps); unigram entropy of the training tokens "
          f"{unigram:.3f} nats, so the model is {unigram - final:.2f} nats below it.")
    print(f"Held-out perplexity {res['perplexity']:.1f}; by kind: "
          + ", ".join(f"{k} {v:.1f}" for k, v in res["perplexity_by_kind"].items()))
    curve = {int(k): v for k, v in res["perplexity_by_context_frames"].items()}
    print("context frames | perplexity of the next frame (held-out videos and sequences)")
    for k, v in curve.items():
        print(f"{k:>14} | {v:10.1f}")
    print(f"plots: {out / 'context_frames.png'}, {Path(a.run) / 'loss.png'}")
    return learning_checks(final, unigram, curve)


def generate(a) -> list[Check]:
    """The next frame of a held-out clip from its first frames, and from no prompt; PSNR of each against the truth."""
    from PIL import Image

    from lvm.data.offline.decode import decode_sentence
    from lvm.data.offline.sources.manifest import read_manifest
    from lvm.data.shards.shard_set import load_sentences

    py = sys.executable
    val = load_sentences(REPO / a.shards / "val")
    held_out = [str(i) for i, k, n in zip(val.ids, val.kinds, val.image_counts(len(val)), strict=True)
                if k == "video" and n > PROMPT_FRAMES]
    if not held_out:
        return [Check(False, f"no held-out video of more than {PROMPT_FRAMES} frames to prompt with")]
    manifest = read_manifest(REPO / a.corpus / "manifest.jsonl")
    by_id = {s.id: s for s in manifest.sentences}
    sentence = by_id.get(held_out[0]) or by_id[held_out[0].split("#")[0]]
    frames = decode_sentence(sentence)[: PROMPT_FRAMES + 1]
    prompt_dir = REPO / a.run / "prompt"
    prompt_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, f in enumerate(frames):
        Image.fromarray(f).save(prompt_dir / f"frame_{i}.png")
        paths.append(str(prompt_dir / f"frame_{i}.png"))
    # plain sampling, 4 samples each: at this scale the copy is soft (p ~0.1 on the right code), and greedy or
    # low-temperature decoding runs into repeating one code (docs/learning.md)
    sampling = ["--seed", str(a.seed), "--temperature", "1.0", "--top-k", "100", "--num-samples", "4"]
    gen, gen0 = Path(a.run) / "generated", Path(a.run) / "generated_unprompted"
    run([py, "launch/generate.py", "--checkpoint", a.run, "--prompt", *paths[:-1], "--truth", paths[-1],
         "--out", str(gen), *sampling])
    run([py, "launch/generate.py", "--checkpoint", a.run, "--unconditional", "--truth", paths[-1], "--out", str(gen0), *sampling])
    prompted = json.loads((REPO / gen / "generation.json").read_text())
    unprompted = json.loads((REPO / gen0 / "generation.json").read_text())
    p1, p0 = prompted["psnr_tokenized_truth"], unprompted["psnr_tokenized_truth"]
    print(f"\nFrame {PROMPT_FRAMES + 1} of held-out clip {sentence.id}, against the truth through the tokenizer: "
          f"generated from its first {PROMPT_FRAMES} frames {p1:.2f} dB, from no prompt {p0:.2f} dB (means of 4 samples) "
          f"(the tokenizer itself reaches {prompted['psnr_tokenizer']:.2f} dB).\n"
          f"grids (prompt | generated | truth): {gen / 'grid.png'}, {gen0 / 'grid.png'}")
    return [generation_check(p1, p0)]


if __name__ == "__main__":
    sys.exit(main())
