#!/usr/bin/env python
"""Evaluate a trained model on shards: perplexity overall, per data kind, vs number of context
frames (video/sequence) and vs number of in-context example pairs. Writes DIR/eval.json and
DIR/context_frames.png, and logs both to TensorBoard when given a run folder.

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder, DeepSpeed checkpoint folder/tag, or exported HF folder")
    p.add_argument("--data", required=True, help="a shard folder, or a make_shards output folder (see --split)")
    p.add_argument("--split", choices=["val", "train", "all"], default="val", help="with a make_shards output folder")
    p.add_argument("--out", required=True, help="output folder for eval.json and context_frames.png")
    p.add_argument("--batch-size", type=int, default=4, help="sentences per forward pass")
    p.add_argument("--max-sentences", type=int, default=None, help="score at most this many sentences per split")
    p.add_argument("--attention", choices=["auto", "flash_attention_2", "sdpa", "eager"], default="auto",
                   help="attention kernels (auto: flash-attention-2 where installed and on a GPU, else sdpa)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    from lvm.data.shards import ShardError, load_sentences
    from lvm.eval.model_io import (
        ModelLoadError,
        load_model,
        model_tokenizer_info,
        run_folder,
        tokenizer_mismatch,
    )
    from lvm.eval.perplexity import Sums, plot, results, score
    from lvm.launch_env import export_torch_env, launch_env, local_device
    from lvm.train.data_setup import check_tokenizer

    env = launch_env()
    device = local_device(env)  # before any CUDA work: NCCL binds each rank to the current device
    try:
        if a.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        folders = data_folders(a.data, a.split)
        tables = [load_sentences(f) for f in folders]
        model_info = model_tokenizer_info(a.checkpoint)
        for f in folders:
            shard_info = check_tokenizer(f, None)
            why = tokenizer_mismatch(model_info, shard_info)
            if why:
                raise ValueError(f"--data {f} was made by tokenizer {shard_info.get('spec_resolved')}, but the model was "
                                 f"trained on tokens of {model_info.get('spec_resolved') or model_info.get('spec')} ({why}): "
                                 "evaluate on shards made by the model's tokenizer")
    except (ShardError, ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model_info is None and env.rank == 0:
        print("note: the model records no tokenizer (tokenizer.json); the shards' tokenizer could not be checked")
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
        return 2
    if env.world_size > 1:
        print(f"rank {env.rank}: {'consolidated the checkpoint' if env.rank == 0 else 'received the weights from rank 0'} "
              f"on {device}", flush=True)
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
    run = run_folder(a.checkpoint)
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
