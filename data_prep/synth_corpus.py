#!/usr/bin/env python
"""Generate the embedded demo corpus (videos, GIFs, image sequences, in-context pairs, single
images) deterministically from a seed, with its manifest.jsonl; or, with --pans N / --scenes N, another video
corpus made from the photographs that ship with scikit-image (for checking a recipe on other videos): N camera pans
over them, or N fixed views of one with cut-outs of others moving over it."""

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
    p.add_argument("--scenes", type=int, default=0, metavar="N",
                   help="instead of the demo corpus: N clips of --frames frames of photo cut-outs moving over a photograph")
    for f in fields(CorpusSize):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default, help=f"number of {f.name.replace('_', ' ')}")
    a = p.parse_args(argv)
    if a.pans < 0 or a.scenes < 0 or (a.pans and a.scenes):
        print("error: --pans and --scenes must be >= 0, and at most one of them given", file=sys.stderr)
        return 2
    if a.pans or a.scenes:
        from lvm.data.photo_videos import make_photo_video_corpus

        if a.frames < 1:
            print("error: --frames must be >= 1", file=sys.stderr)
            return 2
        kind, n = ("pans", a.pans) if a.pans else ("scenes", a.scenes)
        manifest = make_photo_video_corpus(a.out, kind, a.seed, n, a.frames)
        print(f"{kind} corpus in {a.out} ({n} clips of {a.frames} frames, seed {a.seed}); manifest {manifest}")
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
