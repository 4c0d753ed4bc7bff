#!/usr/bin/env python
"""Export a DeepSpeed checkpoint of launch/pretrain.py (ZeRO-2 or ZeRO-3) to a Hugging Face folder
(config.json with BOS/EOS/PAD ids, model.safetensors), loadable with LlamaForCausalLM.from_pretrained."""

from __future__ import annotations

import argparse
import sys

from lvm.artifacts import CheckpointError
from lvm.train.export import export_hf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder or their latest file, or one step_* tag folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="saved weight dtype")
    a = p.parse_args(argv)
    try:
        out = export_hf(a.checkpoint, a.out, a.dtype)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {a.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
