#!/usr/bin/env python
"""Tokenize a corpus into Arrow shards of visual sentences (see lvm.data.offline.pipeline and its units).

Inputs (--input, repeatable): JSONL manifests, folders of them, webdataset tars, or patterns of tars
with brace notation or globs, expanded here (quote them): --input 'laion/{00000..09999}.tar'.
"""

from __future__ import annotations

import argparse
import sys

from lvm.data.derive import DEFAULT_HOLE_RATIO
from lvm.data.offline.config import BuildConfig
from lvm.data.offline.pipeline import build_shards
from lvm.data.offline.writer import summary_line
from lvm.launch_env import work_slice
from lvm.tokenizer.preprocess import RESIZE_MODES


def parse_args(argv=None) -> argparse.Namespace:
    d = BuildConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", "--manifest", dest="inputs", action="append", required=True, metavar="SPEC",
                   help="a JSONL manifest, a folder of *.jsonl (or of tars), a webdataset .tar (.tar.gz, .tgz), or a "
                        "pattern of tars ('laion/{00000..09999}.tar', 'laion/*.tar'); repeatable")
    p.add_argument("--out", required=True, help="output folder: train/, val/, tokenizer.json, index.json, report.json")
    p.add_argument("--tokenizer", default=d.tokenizer,
                   help="vqgan:<dir> (local MaskGIT/MUSE VQGAN weights), patch-kmeans:<dir>, or patch-kmeans "
                        "(the embedded codebook fitted on this corpus, in OUT/tokenizer; see --fit-only)")
    p.add_argument("--fit-only", action="store_true",
                   help="only fit the embedded tokenizer (once, before the ranks or array tasks run)")
    p.add_argument("--workers", type=int, default=d.workers, help="decode processes (0: decode in this process)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="frames per tokenizer batch")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of sentence ids held out in val/")
    p.add_argument("--sentences-per-shard", type=int, default=d.sentences_per_shard,
                   help="an input unit's output is cut into shards of at most this many sentences")
    p.add_argument("--part-bytes", type=int, default=d.part_bytes,
                   help="a manifest larger than this is cut into units of this many bytes")
    p.add_argument("--max-images", type=int, default=d.max_images, help="longer sentences are split into chunks")
    p.add_argument("--resize", choices=RESIZE_MODES, default=d.resize,
                   help="squash: resize to 256x256 as LVM did; center-crop: keep aspect, crop the centre")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the embedded tokenizer's fit")
    p.add_argument("--fit-images", type=int, default=d.fit_images, help="images the embedded tokenizer is fitted on")
    p.add_argument("--device", default=None, help="tokenizer device (default: cuda:LOCAL_RANK if a GPU is visible, else cpu)")
    p.add_argument("--rank", type=int, default=None,
                   help="this task's slice (default: RANK or SLURM_PROCID, combined with SLURM_ARRAY_TASK_ID)")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of slices (default: WORLD_SIZE or SLURM_NTASKS, times SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--index-only", action="store_true", help="only write index.json/report.json (after all ranks)")
    p.add_argument("--overwrite", action="store_true", help="delete OUT first instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--store", action="store_true",
                   help="write an image-level token store of records (images, pairs; lvm.data.store) for data_prep/compose.py")
    p.add_argument("--hole-ratio", type=float, default=DEFAULT_HOLE_RATIO,
                   help="--store: share of inpainting inputs with one square hole (the others: 32-px patches masked)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    rank, world = work_slice()
    cfg = BuildConfig(inputs=a.inputs, out=a.out, tokenizer=a.tokenizer, workers=a.workers,
                      batch_size=a.batch_size, val_fraction=a.val_fraction,
                      sentences_per_shard=a.sentences_per_shard, part_bytes=a.part_bytes, max_images=a.max_images,
                      resize=a.resize, seed=a.seed, fit_images=a.fit_images,
                      rank=rank if a.rank is None else a.rank, world_size=world if a.world_size is None else a.world_size,
                      index_only=a.index_only, fit_only=a.fit_only, device=a.device, progress=not a.no_progress)
    if a.store:
        from lvm.data.store_build import run_store

        return run_store(cfg, a.hole_ratio, a.overwrite)
    try:
        summary = build_shards(cfg, overwrite=a.overwrite)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_line(summary))
    report = summary["report"]
    if report is not None and sum(t["sentences"] for t in report["written"].values()) == 0:
        print("error: nothing was written: every sentence was skipped (see report.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
