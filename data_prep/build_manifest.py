#!/usr/bin/env python
"""Write a JSONL manifest from an ordinary folder tree (see lvm.data.offline.sources.manifest.manifest_from_tree).

Conventions under ROOT: images/** (single images), videos/** (one sentence per video),
sequences/<name>/ (one sentence per folder), pairs/<task>/{input,label}/ (files matched by stem,
grouped into in-context sentences of --pairs pairs); image files directly in ROOT are single images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lvm.data.offline.sources.manifest import manifest_from_tree, write_manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="corpus folder")
    p.add_argument("-o", "--out", help="manifest path (default ROOT/manifest.jsonl)")
    p.add_argument("--pairs", type=int, default=8, help="(input, label) pairs per in-context sentence (default 8)")
    p.add_argument("--max-frames", type=int, default=16, help="frames taken from each video (default 16)")
    p.add_argument("--stride", type=int, default=1, help="take every N-th video frame (default 1)")
    a = p.parse_args(argv)
    if a.pairs < 1 or a.max_frames < 1 or a.stride < 1:
        print("error: --pairs, --max-frames and --stride must be positive", file=sys.stderr)
        return 2
    try:
        entries = manifest_from_tree(a.root, a.pairs, a.max_frames, a.stride)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else Path(a.root) / "manifest.jsonl"
    if a.out:  # paths in the manifest are relative to its own folder
        root, base = Path(a.root).resolve(), out.resolve().parent
        for e in entries:
            for key in ("images", "video"):
                if key in e:
                    fix = lambda q: str((root / q).relative_to(base)) if (root / q).is_relative_to(base) else str(root / q)  # noqa: E731
                    e[key] = [fix(q) for q in e[key]] if key == "images" else fix(e[key])
    write_manifest(entries, out)
    kinds = {}
    for e in entries:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    print(f"wrote {len(entries)} sentences to {out}: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    return 0 if entries else 1


if __name__ == "__main__":
    sys.exit(main())
