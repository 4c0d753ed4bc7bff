#!/usr/bin/env python
"""LVM's tokenized data (JSONL, {"tokens": base64 of int32 codes} per line) <-> our Arrow shards.

  import: python data_prep/lvm_jsonl.py import --jsonl a.jsonl b.jsonl --kind video --out shards/ --tokenizer-spec vqgan:<dir>
  export: python data_prep/lvm_jsonl.py export --shards shards/ --out data.jsonl
"""

from __future__ import annotations

import argparse
import sys

from lvm.data.offline.config import BuildConfig
from lvm.data.shards.format import KINDS, ShardError
from lvm.launch_env import work_slice


def parse_args(argv=None) -> argparse.Namespace:
    d = BuildConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="LVM token files -> shards (no re-tokenizing)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    imp.add_argument("--jsonl", nargs="+", required=True, metavar="SPEC",
                     help="LVM token files (paths, folders, or patterns with braces/globs)")
    imp.add_argument("--kind", required=True, choices=KINDS, help="kind of every sentence in these files")
    imp.add_argument("--out", required=True, help="output shard folder")
    imp.add_argument("--tokenizer-spec", default=None,
                     help="what made the tokens, e.g. vqgan:<dir> (default: F.tokenizer.json beside the first file)")
    imp.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of sentences held out in val/")
    imp.add_argument("--sentences-per-shard", type=int, default=d.sentences_per_shard)
    imp.add_argument("--rank", type=int, default=None, help="this task's slice (default: from the launcher)")
    imp.add_argument("--world-size", type=int, default=None, help="number of slices (default: from the launcher)")
    imp.add_argument("--index-only", action="store_true", help="only write index.json/report.json (after all ranks)")
    imp.add_argument("--no-progress", action="store_true")
    exp = sub.add_parser("export", help="shards -> one LVM token file", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    exp.add_argument("--shards", required=True, help="a make_shards/import output folder")
    exp.add_argument("--out", required=True, help="the JSONL file to write (and OUT.tokenizer.json beside it)")
    exp.add_argument("--split", choices=["train", "val", "all"], default="train")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from lvm.data.offline.pipeline import import_token_files
    from lvm.data.offline.sources.lvm_jsonl import export_token_file
    from lvm.data.offline.writer import summary_line

    try:
        if a.command == "export":
            r = export_token_file(a.shards, a.out, a.split)
            print(f"wrote {r['sentences']} sentences ({r['tokens']} tokens) to {r['out']}")
            return 0
        rank, world = work_slice()
        s = import_token_files(a.jsonl, a.kind, a.out, a.tokenizer_spec, val_fraction=a.val_fraction,
                               sentences_per_shard=a.sentences_per_shard, index_only=a.index_only,
                               rank=rank if a.rank is None else a.rank,
                               world_size=world if a.world_size is None else a.world_size, progress=not a.no_progress)
    except (ValueError, FileNotFoundError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_line(s))
    if s["report"] is not None and sum(t["sentences"] for t in s["report"]["written"].values()) == 0:
        print("error: nothing was imported: every line was skipped (see report.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
