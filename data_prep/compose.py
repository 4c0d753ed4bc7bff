#!/usr/bin/env python
"""Compose visual sentences from a token store (make_shards.py --store) into ordinary shards, encoding nothing.

  python data_prep/compose.py --store STORE --out OUT --pairs TASK --shots 8 --epochs 2 --seed 0
  python data_prep/compose.py --store STORE --out OUT --categories --images-per-shot 2 --shots 4
  python data_prep/compose.py --store STORE --out OUT --multi depth segmentation --shots 3

OUT holds train/, val/, tokenizer.json, index.json (what launch/pretrain.py --data OUT reads), compose.json and the
store's palettes. Ranks and array tasks (RANK/WORLD_SIZE, SLURM_*) share the blocks of sentences; run --index-only
once after them. A rerun resumes; the bytes never depend on ranks or kills (see lvm.data.compose).
"""

from __future__ import annotations

import argparse
import sys

from lvm.data.compose import ComposeConfig, compose, compose_summary
from lvm.data.store import StoreError
from lvm.launch_env import work_slice


def parse_args(argv=None) -> argparse.Namespace:
    d = ComposeConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="a token store written by make_shards.py --store")
    p.add_argument("--out", required=True, help="output folder: train/, val/, tokenizer.json, index.json")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--pairs", metavar="TASK", help="in-context pairs x1, y1, ... of one task")
    what.add_argument("--categories", nargs="*", metavar="NAME",
                      help="category sentences c1, c1, c2, c2, ... (of the named categories; none named: all)")
    what.add_argument("--multi", nargs="+", metavar="TASK",
                      help="groups x, y_task1, y_task2, ... of the inputs every named task has a pair for")
    p.add_argument("--shots", type=int, default=d.shots, help="pairs, shots or groups per sentence (default %(default)s)")
    p.add_argument("--images-per-shot", type=int, default=d.images_per_shot,
                   help="--categories: images of one category per shot (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training groupings, each a fresh permutation (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every grouping (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of items (pairs, images, groups) held out in val/ (default %(default)s)")
    p.add_argument("--sentences-per-shard", type=int, default=d.sentences_per_shard, help="(default %(default)s)")
    p.add_argument("--keep-task-order", action="store_true", help="--multi: labels in the order named (default: permuted per sentence, as LVM)")
    p.add_argument("--rank", type=int, default=None, help="this task's slice (default: from the launcher)")
    p.add_argument("--world-size", type=int, default=None, help="number of slices (default: from the launcher)")
    p.add_argument("--index-only", action="store_true", help="only write the index (after all ranks)")
    p.add_argument("--overwrite", action="store_true", help="delete OUT first instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    rank, world = work_slice()
    mode, names = (("pairs", [a.pairs]) if a.pairs is not None else ("multi", a.multi) if a.multi is not None
                   else ("categories", a.categories))
    cfg = ComposeConfig(store=a.store, out=a.out, mode=mode, names=list(names), shots=a.shots,
                        images_per_shot=a.images_per_shot, epochs=a.epochs, seed=a.seed, val_fraction=a.val_fraction,
                        sentences_per_shard=a.sentences_per_shard, shuffle_tasks=not a.keep_task_order,
                        rank=rank if a.rank is None else a.rank, world_size=world if a.world_size is None else a.world_size,
                        index_only=a.index_only, progress=not a.no_progress)
    try:
        summary = compose(cfg, overwrite=a.overwrite)
    except (ValueError, FileNotFoundError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(compose_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
