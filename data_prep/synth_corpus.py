#!/usr/bin/env python
"""Generate the embedded demo corpus (videos, GIFs, image sequences, in-context pairs, single
images) deterministically from a seed, with its manifest.jsonl; or, with --pans N, a second video corpus of N
camera pans over the photographs that ship with scikit-image (for checking a recipe on other videos)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from lvm.data.synth import CorpusSize, make_corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="data/demo_corpus", help="corpus folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pans", type=int, default=0, metavar="N",
                   help="instead of the demo corpus: N camera-pan clips of --frames frames over real photographs")
    for f in fields(CorpusSize):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default, help=f"number of {f.name.replace('_', ' ')}")
    a = p.parse_args(argv)
    if a.pans < 0:
        print("error: --pans must be >= 0", file=sys.stderr)
        return 2
    if a.pans:
        from lvm.data.pans import make_pan_corpus

        if a.frames < 1:
            print("error: --frames must be >= 1", file=sys.stderr)
            return 2
        manifest = make_pan_corpus(a.out, a.seed, a.pans, a.frames)
        print(f"pan corpus in {a.out} ({a.pans} clips of {a.frames} frames, seed {a.seed}); manifest {manifest}")
        return 0
    size = CorpusSize(**{f.name: getattr(a, f.name) for f in fields(CorpusSize)})
    if any(v < 0 for v in size.__dict__.values()) or size.frames < 1:
        print("error: counts must be >= 0 and --frames >= 1", file=sys.stderr)
        return 2
    manifest = make_corpus(a.out, a.seed, size)
    print(f"demo corpus in {a.out} (seed {a.seed}); manifest {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
