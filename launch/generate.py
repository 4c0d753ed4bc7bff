#!/usr/bin/env python
"""Generate the next image(s) of a visual prompt with a trained model.

    python launch/generate.py --checkpoint runs/demo --prompt f0.png f1.png f2.png --out gen/   # next frame
    python launch/generate.py --checkpoint runs/demo --prompt a.png a_edges.png b.png --out gen/  # analogy A A' B -> B'
    python launch/generate.py --checkpoint runs/demo --unconditional --truth f3.png --out gen0/      # no prompt
    python launch/generate.py --checkpoint runs/demo --prompts gen.jsonl --candidates 4 --out gen/  # LVM's file

Prompt images are tokenized with the tokenizer the model was trained with (recorded with the run, or --tokenizer).
With --truth (the true next image(s)), the grid gets a truth column and OUT/generation.json holds the PSNR of
each generated image against the truth as the tokenizer reproduces it (encoded and decoded: the best any model
of these tokens can do) and against the truth's own pixels.
Writes OUT/generated_<i>.png per generated image and OUT/grid.png (prompt | generation, a row per sample).

With --prompts F.jsonl (LVM's generation file: per line {"input": [image paths], "output": path}), each line's
candidates go to its `output` (relative to OUT): LVM's layout, a row per candidate and the --n-images new images
side by side, and with several candidates each row also as <stem>_<c><suffix>. OUT/generated.jsonl holds one
result per line of F, in order (the written paths, or the reason the line was skipped). Relative input paths
start from --base (default: F's folder). A bad line is reported by its number and skipped; the exit status is 1
only when no line could be generated. See lvm/eval/prompts.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def prompts_main(a) -> int:
    from tqdm import tqdm

    from lvm.artifacts import locate
    from lvm.eval.generate import PromptError, Sampling, prompt_room
    from lvm.eval.model_io import ModelLoadError, load_model
    from lvm.eval.prompts import ImageCodes, generate_prompts, read_prompts, tokenizer_for, write_results

    try:
        if a.n_images < 1 or a.num_samples < 1 or a.batch_size < 1:
            raise PromptError("--n-images, --candidates and --batch-size must be >= 1")
        if a.truth:
            raise PromptError("--truth goes with --prompt or --unconditional, not --prompts")
        lines = read_prompts(a.prompts, "generate", a.base, a.out)
        prompt_room(locate(a.checkpoint).window(), a.n_images)  # checked before any weights are read
        tok, resize = tokenizer_for(a.checkpoint, a.tokenizer)
        model, _ = load_model(a.checkpoint)
    except (PromptError, ModelLoadError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images = ImageCodes(tok, resize)

    def report(b):
        tqdm.write(f"error: {a.prompts} line {b.number}: {b.reason} (skipped)", file=sys.stderr)

    s = Sampling(a.n_images, a.temperature, a.top_k or None, a.top_p, a.seed, a.num_samples, not a.no_cache)
    results = generate_prompts(model, images, lines, model.config.max_position_embeddings, s, a.batch_size, report)
    images.close()
    out = Path(a.out) / "generated.jsonl"
    write_results(results, out)
    done = sum("error" not in r for r in results)
    if not done:
        print(f"error: no line of {a.prompts} could be generated ({len(results)} skipped); see {out}", file=sys.stderr)
        return 1
    print(f"generated {a.num_samples} candidate(s) of {a.n_images} image(s) for {done} line(s), "
          f"{len(results) - done} skipped; wrote {out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder, DeepSpeed checkpoint folder/tag, or exported HF folder")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", nargs="+", help="prompt image files, in order")
    g.add_argument("--prompt-file", help="JSON list of prompt image paths (for long prompts)")
    g.add_argument("--unconditional", action="store_true", help="no prompt: generate from [BOS] alone")
    g.add_argument("--prompts", help='LVM\'s generation file: JSONL lines {"input": [paths], "output": path}')
    p.add_argument("--base", default=None, help="with --prompts: the folder relative input paths start from "
                                                "(default: the JSONL file's folder)")
    p.add_argument("--batch-size", type=int, default=4, help="with --prompts: lines sampled together")
    p.add_argument("--truth", nargs="+", default=None, help="the true next image(s), one per --n-images: PSNR and a grid column")
    p.add_argument("--out", required=True, help="output folder (with --prompts: where relative output paths start)")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the one that made the training shards)")
    p.add_argument("--n-images", type=int, default=1, help="images to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=100, help="0 disables")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", "--candidates", dest="num_samples", type=int, default=1,
                   help="samples (candidates) per prompt")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every token (slow; for checks)")
    a = p.parse_args(argv)
    if a.base and not a.prompts:
        p.error("--base goes with --prompts (--prompt-file paths start from the file's folder)")

    from lvm.data.shards.format import atomic_write_text
    from lvm.eval.generate import (
        PromptError,
        Sampling,
        fit_prompt,
        generation_report,
        prompt_room,
        sample_codes,
        save_outputs,
    )

    def write_json(path, obj):
        atomic_write_text(path, json.dumps(obj, indent=2))
    from lvm.artifacts import locate
    from lvm.eval.model_io import ModelLoadError, load_model
    from lvm.eval.prompts import tokenizer_for
    from lvm.tokenizer.preprocess import SourceError, load_image, to_pixels

    if a.prompts:
        return prompts_main(a)
    try:
        if a.n_images < 1 or a.num_samples < 1:
            raise PromptError("--n-images and --num-samples must be >= 1")
        paths = [] if a.unconditional else a.prompt
        if a.prompt_file:
            paths = json.loads(Path(a.prompt_file).read_text())
            if not isinstance(paths, list) or not paths or not all(isinstance(x, str) for x in paths):
                raise PromptError(f"--prompt-file {a.prompt_file} must hold a JSON list of paths")
            base = Path(a.prompt_file).parent
            paths = [str(x if Path(x).is_absolute() else base / x) for x in paths]
        frames = []
        for path in paths:
            try:
                frames.append(load_image(path))
            except SourceError as e:
                raise PromptError(f"prompt image {path}: {e}") from None
        truth = []
        for path in a.truth or []:
            try:
                truth.append(load_image(path))
            except SourceError as e:
                raise PromptError(f"--truth image {path}: {e}") from None
        if truth and len(truth) != a.n_images:
            raise PromptError(f"--truth gives {len(truth)} image(s) for --n-images {a.n_images}")
        prompt_room(locate(a.checkpoint).window(), a.n_images)  # checked before any weights are read
        tok, _ = tokenizer_for(a.checkpoint, a.tokenizer)
        model, _ = load_model(a.checkpoint)
        codes = tok.encode(to_pixels(np.stack(frames))) if frames else torch.zeros(0, tok.tokens_per_image, dtype=torch.long)
        codes, dropped = fit_prompt(codes, model.config.max_position_embeddings, a.n_images)
    except (PromptError, ModelLoadError, FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dropped:
        print(f"prompt cut from the left by {dropped} image(s) to fit the {model.config.max_position_embeddings}-token window")
    s = Sampling(a.n_images, a.temperature, a.top_k or None, a.top_p, a.seed, a.num_samples, not a.no_cache)
    new = sample_codes(model, codes, s)
    with torch.no_grad():
        prompt_px = tok.decode(codes) if len(codes) else torch.zeros(0, 3, tok.image_size, tok.image_size)
        gen_px = torch.stack([tok.decode(x) for x in new])
        truth_px = to_pixels(np.stack(truth)) if truth else None
        truth_tok = tok.decode(tok.encode(truth_px)) if truth else None
    out_paths = save_outputs(prompt_px, gen_px, a.out, truth_tok)
    for q in out_paths:
        print(q)
    print(Path(a.out) / "grid.png")
    if truth:
        report = generation_report(gen_px, truth_tok, truth_px)
        write_json(Path(a.out) / "generation.json", {"prompt_images": len(codes), **report})
        print(f"PSNR against the truth through the tokenizer {report['psnr_tokenized_truth']:.2f} dB "
              f"(against its pixels {report['psnr_truth']:.2f} dB), mean over {len(out_paths)} generated image(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
