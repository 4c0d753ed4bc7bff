#!/usr/bin/env python
"""Evaluate a trained model on shards: perplexity overall, per data kind, vs number of context
frames (video/sequence) and vs number of in-context example pairs. Writes DIR/eval.json and
DIR/context_frames.png, and logs both to TensorBoard when given a run folder.

With --prompts F.jsonl (LVM's evaluation file: per line {"input": [image paths, few-shot examples
included], "target": [image paths]}), the perplexity of each line's targets given its inputs, the images
tokenized by the model's tokenizer: DIR/prompt_scores.jsonl holds one result per line of F, in order
(perplexity, NLL and token count of the targets, or the reason the line was skipped), DIR/prompt_eval.json
the totals (perplexity: the mean over lines, LVM's figure). A bad line is reported by its number and
skipped; the exit status is 1 only when no line could be scored. See lvm/eval/prompts.py.

Runs as one process or under torchrun/deepspeed/srun (each rank scores a slice on its own GPU:
cuda:LOCAL_RANK, or the one GPU a cluster shows each task). Only rank 0 reads and consolidates the
checkpoint; the others receive the weights. The shards must come from the tokenizer the model was
trained on (checked before any weights are read)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

LOAD_TIMEOUT = timedelta(hours=2)  # collectives' timeout: covers rank 0 consolidating a large checkpoint


def data_folders(data: str, split: str) -> list[Path]:
    root = Path(data)
    if (root / "train").is_dir() or (root / "val").is_dir():
        return [root / s for s in (("train", "val") if split == "all" else (split,))]
    return [root]


def load_on_every_rank(a, env, device):
    """The model on this rank's device (rank 0 reads the checkpoint, the others receive it), or None after one
    error line."""
    from lvm.eval.model_io import ModelLoadError, load_model
    from lvm.launch_env import export_torch_env

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.world_size > 1:
        export_torch_env(env)
        cuda = device.type == "cuda"
        # the other ranks wait in a broadcast while rank 0 reads and consolidates the checkpoint (minutes for a 7B
        # ZeRO-3 one): NCCL's default timeout (10 minutes; gloo's 30) would abort them before it ends
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=LOAD_TIMEOUT,
                                             **({"device_id": device} if cuda else {}))
    try:
        model, _ = load_model(a.checkpoint, device, a.attention)
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        if env.rank == 0:  # every rank raises rank 0's load error; one says it
            print(f"error: {e}", file=sys.stderr)
        if env.world_size > 1:
            torch.distributed.destroy_process_group()
        return None
    if env.world_size > 1:
        print(f"rank {env.rank}: {'consolidated the checkpoint' if env.rank == 0 else 'received the weights from rank 0'} "
              f"on {device}", flush=True)
    return model


def prompts_main(a, env, device) -> int:
    """--prompts: each rank scores every world-th line; rank 0 writes the results of all, in the file's order."""
    from tqdm import tqdm

    from lvm.artifacts import locate
    from lvm.data.shards.format import atomic_write_text
    from lvm.eval.prompts import (
        ImageCodes,
        read_prompts,
        score_prompts,
        summary,
        tokenizer_for,
        write_results,
    )

    try:
        if a.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        lines = read_prompts(a.prompts, "evaluate", a.base)
        locate(a.checkpoint).window()  # a path that names no model stops here, before any image is read
        tok, resize = tokenizer_for(a.checkpoint, a.tokenizer, device)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = load_on_every_rank(a, env, device)
    if model is None:
        return 2
    images = ImageCodes(tok, resize)

    def report(b):
        tqdm.write(f"error: {a.prompts} line {b.number}: {b.reason} (skipped)", file=sys.stderr)

    mine = score_prompts(model, images, lines[env.rank :: env.world_size], model.config.max_position_embeddings,
                         a.batch_size, report, progress=env.rank == 0)
    images.close()
    if env.world_size > 1:
        gathered: list = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, mine)
        torch.distributed.destroy_process_group()
        mine = sorted((r for part in gathered for r in part), key=lambda r: r["line"])
    if env.rank != 0:
        return 0
    out = Path(a.out)
    write_results(mine, out / "prompt_scores.jsonl")
    total = {"prompts": str(a.prompts), **summary(mine)}
    atomic_write_text(out / "prompt_eval.json", json.dumps(total, indent=2))
    skipped = len(total["skipped_lines"])
    if not total["scored"]:
        print(f"error: no line of {a.prompts} could be scored ({skipped} skipped); see {out / 'prompt_scores.jsonl'}",
              file=sys.stderr)
        return 1
    print(f"target perplexity {total['perplexity']:.2f} (mean over {total['scored']} lines; "
          f"{total['perplexity_over_tokens']:.2f} over all {total['tokens']} target tokens); {skipped} line(s) skipped")
    print(f"wrote {out / 'prompt_scores.jsonl'} and {out / 'prompt_eval.json'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder, DeepSpeed checkpoint folder/tag, or exported HF folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a shard folder, or a make_shards output folder (see --split)")
    src.add_argument("--prompts", help='LVM\'s evaluation file: JSONL lines {"input": [paths], "target": [paths]}')
    p.add_argument("--base", default=None, help="with --prompts: the folder relative image paths start from "
                                                "(default: the JSONL file's folder)")
    p.add_argument("--tokenizer", default=None, help="with --prompts: tokenizer spec (default: the one recorded with the model)")
    p.add_argument("--split", choices=["val", "train", "all"], default="val", help="with a make_shards output folder")
    p.add_argument("--out", required=True, help="output folder for eval.json and context_frames.png "
                                                "(with --prompts: prompt_scores.jsonl and prompt_eval.json)")
    p.add_argument("--batch-size", type=int, default=4, help="sentences (--prompts: lines) per forward pass")
    p.add_argument("--max-sentences", type=int, default=None, help="score at most this many sentences per split")
    p.add_argument("--attention", choices=["auto", "flash_attention_2", "sdpa", "eager"], default="auto",
                   help="attention kernels (auto: flash-attention-2 where installed and on a GPU, else sdpa)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.prompts and a.max_sentences is not None:
        p.error("--max-sentences goes with --data; --prompts scores every line of its file")
    if a.data and (a.base or a.tokenizer):
        p.error("--base and --tokenizer go with --prompts (shards carry their tokenizer)")

    from lvm.artifacts import TokenizerRecord, locate
    from lvm.data.shards.format import ShardError
    from lvm.data.shards.shard_set import load_sentences
    from lvm.eval.model_io import ModelLoadError
    from lvm.eval.perplexity import Sums, plot, results, score
    from lvm.launch_env import launch_env, local_device
    from lvm.train.data_setup import check_tokenizer

    env = launch_env()
    device = local_device(env)  # before any CUDA work: NCCL binds each rank to the current device
    if a.prompts:
        return prompts_main(a, env, device)
    try:
        if a.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        folders = data_folders(a.data, a.split)
        tables = [load_sentences(f) for f in folders]
        model_info = locate(a.checkpoint).tokenizer_info()  # None when the model records no tokenizer
        for f in folders:
            shard_info = check_tokenizer(f, None)
            why = model_info and TokenizerRecord.from_info(shard_info).mismatch(TokenizerRecord.from_info(model_info),
                                                                                "the model's")
            if why:
                raise ValueError(f"--data {f} was made by tokenizer {shard_info.get('spec_resolved')}, but the model was "
                                 f"trained on tokens of {model_info.get('spec_resolved') or model_info.get('spec')} ({why}): "
                                 "evaluate on shards made by the model's tokenizer")
    except (ShardError, ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model_info is None and env.rank == 0:
        print("note: the model records no tokenizer (tokenizer.json); the shards' tokenizer could not be checked")
    model = load_on_every_rank(a, env, device)
    if model is None:
        return 2
    window = model.config.max_position_embeddings
    total = Sums()
    for t in tables:
        s = score(model, t, window, a.batch_size, env.rank, env.world_size, a.max_sentences)
        for k in s.n:
            total.add(k, s.nll[k], s.n[k])
    if env.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if env.rank != 0:
        return 0
    res = results(total)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out / "eval.json")
    plot(res, out / "context_frames.png")
    run = locate(a.checkpoint).run_dir
    if run is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run / "tensorboard")) as w:
            w.add_scalar("eval/perplexity", res["perplexity"])
            for k, v in res["perplexity_by_kind"].items():
                w.add_scalar(f"eval/perplexity/{k}", v)
            for k, v in res["perplexity_by_context_frames"].items():
                w.add_scalar("eval/perplexity_vs_context_frames", v, int(k))
            for k, v in res["perplexity_by_context_pairs"].items():
                w.add_scalar("eval/perplexity_vs_context_pairs", v, int(k))
    print(f"perplexity {res['perplexity']:.2f} over {res['tokens']} tokens; by kind: "
          + ", ".join(f"{k} {v:.2f}" for k, v in res["perplexity_by_kind"].items()))
    if res["perplexity_by_context_frames"]:
        print("context frames | perplexity of the next frame")
        for k, v in res["perplexity_by_context_frames"].items():
            print(f"{int(k):>14} | {v:10.2f}")
    print(f"wrote {out / 'eval.json'} and {out / 'context_frames.png'}")
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # skip teardown of the communication backends' native threads (see launch/pretrain.py)
