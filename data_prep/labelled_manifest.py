#!/usr/bin/env python
"""Write a token-store manifest from a folder of labelled images (layouts in lvm.data.labelled).

  python data_prep/labelled_manifest.py ROOT [--out ROOT/store.jsonl] [--derive colorization inpainting]

Then: make_shards.py --input ROOT/store.jsonl --out STORE --store, and data_prep/compose.py --store STORE ...
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from lvm.data.derive import DERIVED
from lvm.data.labelled import manifest_from_labelled_tree
from lvm.data.offline.sources.manifest import write_manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="folder with images/ and annotations/, depth/, normals/, panoptic/ or categories/")
    p.add_argument("--out", default=None, help="manifest to write (default ROOT/store.jsonl)")
    p.add_argument("--derive", nargs="*", default=[], choices=DERIVED, help="derived pairs for every image of images/")
    p.add_argument("--dataset", default=None, help="name of the segmentation palette (default: ROOT's folder name)")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.root) / "store.jsonl"
    try:
        entries = manifest_from_labelled_tree(a.root, tuple(a.derive), a.dataset, base=out.parent)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not entries:
        print(f"error: {a.root} holds no labelled image, category folder or image to derive from", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(entries, out)
    tasks = Counter(e.get("task") or (f"category {e['category']}" if "category" in e else e.get("derive")) for e in entries)
    print(f"wrote {len(entries)} records to {out}: " + ", ".join(f"{k} {v}" for k, v in sorted(tasks.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
