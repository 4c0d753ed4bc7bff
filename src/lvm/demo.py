"""`make demo`: the whole pipeline on the embedded demo corpus, on whatever machine this is.

Stages: generate the demo corpus -> make shards (fitting the embedded tokenizer) -> train the
`tiny` model with DeepSpeed -> evaluate. Each stage is the same CLI a user would run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="data/demo_corpus")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", default="runs/demo", help="training run folder")
    p.add_argument("--steps", type=int, default=300, help="training steps of the tiny model")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (processes)")
    p.add_argument("--skip-train", action="store_true", help="stop after making shards")
    a = p.parse_args(argv)
    py = sys.executable
    manifest = Path(a.corpus) / "manifest.jsonl"
    if not (REPO / manifest).is_file():
        run([py, "data_prep/synth_corpus.py", "--out", a.corpus, "--seed", str(a.seed)])
    run([py, "data_prep/make_shards.py", "--manifest", str(manifest), "--out", a.shards, "--seed", str(a.seed),
         "--workers", "2", "--val-fraction", "0.1"])
    report = json.loads((REPO / a.shards / "report.json").read_text())
    w = report["written"]
    print(f"\nShards are in {a.shards}/ (train/, val/, tokenizer.json, index.json, report.json).\n"
          f"The demo corpus of {a.corpus} became {w['train']['sentences']} training and {w['val']['sentences']} "
          f"validation visual sentences ({w['train']['images'] + w['val']['images']} images of 256 tokens each, "
          f"{report['bytes_per_image']} bytes per image on disk); {report['skipped_count']} sources were skipped. "
          f"The tokenizer is the embedded patch k-means codebook fitted on this corpus and saved in "
          f"{a.shards}/tokenizer so that tokens can be decoded back to pixels.\n")
    if a.skip_train:
        return 0
    train(a)
    evaluate_and_generate(a)
    return 0


def train(a) -> None:
    import shutil

    import torch

    ranks = torch.cuda.device_count() or a.ranks
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    run([deepspeed, "--num_gpus", str(ranks), "--master_port", "29561", "launch/pretrain.py",
         "--ds_config", "ds_configs/zero2.json", "--model", "tiny", "--data", a.shards, "--output", a.run,
         "--seq-len", "4096", "--micro-batch", "1", "--max-steps", str(a.steps), "--warmup-steps", "20",
         "--lr", "2e-3", "--min-lr", "2e-4", "--log-every", "25", "--eval-every", str(max(1, a.steps // 3)),
         "--save-every", str(a.steps), "--seed", str(a.seed)])
    rows = [json.loads(x) for x in (REPO / a.run / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in rows if r["split"] == "train"]
    va = [r for r in rows if r["split"] == "val"]
    print(f"\nTrained the tiny model with DeepSpeed ZeRO-2 on {ranks} ranks: training loss "
          f"{tr[0]['loss']:.3f} (step {tr[0]['step']}) -> {tr[-1]['loss']:.3f} (step {tr[-1]['step']}); "
          + (f"validation perplexity {va[0]['perplexity']:.1f} (step {va[0]['step']}) -> {va[-1]['perplexity']:.1f} "
             f"(step {va[-1]['step']}). " if va else "")
          + f"TensorBoard logs: tensorboard --logdir {a.run}/tensorboard; checkpoints in {a.run}/checkpoints.")



def evaluate_and_generate(a) -> None:
    """Perplexity vs context on the held-out sentences, and a generated next frame for a held-out video."""
    from PIL import Image

    from lvm.data.decode import decode_sentence
    from lvm.data.manifest import read_manifest
    from lvm.data.shards import load_sentences

    py = sys.executable
    out = Path(a.run) / "eval"
    run([py, "launch/evaluate.py", "--checkpoint", a.run, "--data", a.shards, "--split", "val", "--out", str(out)])
    val = load_sentences(REPO / a.shards / "val")
    held_out = [str(i) for i, k in zip(val.ids, val.kinds, strict=True) if k == "video"]
    pool = held_out or [str(i) for i in load_sentences(REPO / a.shards / "train").ids if str(i).startswith("video/")]
    manifest = read_manifest(REPO / a.corpus / "manifest.jsonl")
    sentence = next(s for s in manifest.sentences if s.id == pool[0])
    frames = decode_sentence(sentence)[:4]
    prompt_dir = REPO / a.run / "prompt"
    prompt_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, f in enumerate(frames):
        Image.fromarray(f).save(prompt_dir / f"frame_{i}.png")
        paths.append(str(prompt_dir / f"frame_{i}.png"))
    gen = Path(a.run) / "generated"
    run([py, "launch/generate.py", "--checkpoint", a.run, "--prompt", *paths, "--out", str(gen), "--seed", str(a.seed),
         "--temperature", "0.8", "--top-k", "50"])
    res = json.loads((REPO / out / "eval.json").read_text())
    print(f"\nHeld-out perplexity {res['perplexity']:.1f}; by kind: "
          + ", ".join(f"{k} {v:.1f}" for k, v in res["perplexity_by_kind"].items()))
    print("context frames | perplexity of the next frame (held-out videos and sequences)")
    for k, v in res["perplexity_by_context_frames"].items():
        print(f"{int(k):>14} | {v:10.1f}")
    print(f"plot: {out / 'context_frames.png'}")
    print(f"next frame of held-out {'video' if held_out else 'training video'} {sentence.id} from its first "
          f"{len(paths)} frames: {gen / 'generated_0.png'} (prompt | generation: {gen / 'grid.png'})")


if __name__ == "__main__":
    sys.exit(main())
