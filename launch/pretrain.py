#!/usr/bin/env python
"""Pretrain a LlamaForCausalLM on visual sentences with DeepSpeed.

    deepspeed [--num_gpus N] launch/pretrain.py --ds_config ds_configs/zero3.json [flags]
    torchrun --nproc-per-node N launch/pretrain.py ...      srun launch/pretrain.py ...
    python launch/pretrain.py ...                           (one process)
"""

from __future__ import annotations

import os
import sys

from lvm.train.options import parse_options
from lvm.train.trainer import USER_ERRORS, train


def main(argv=None) -> int:
    try:
        opts, given = parse_options(argv)
        return train(opts, given)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    rc = main()
    # Everything is saved and the process group is gone; skip interpreter teardown, where native
    # threads of the communication backends have been seen to abort the process (SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
