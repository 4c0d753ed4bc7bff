#!/usr/bin/env python
"""Pretrain a LlamaForCausalLM on visual sentences with DeepSpeed.

    deepspeed [--num_gpus N] launch/pretrain.py --ds_config ds_configs/zero3.json [flags]
    torchrun --nproc-per-node N launch/pretrain.py ...      srun launch/pretrain.py ...
    python launch/pretrain.py ...                           (one process)
    python launch/pretrain.py --config configs/lvm-1b.yaml [flags] --print-config   (the resolved run; nothing trains)
"""

from __future__ import annotations

import os
import sys

from lvm.train.options import parse_command, recipe_yaml


def main(argv=None) -> int:
    try:
        opts, given, print_config = parse_command(argv)
    except ValueError as e:  # a bad flag, --config file or value (lvm.train.options.OptionsError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if print_config:
        if os.environ.get("RANK", "0") == "0":  # one copy under a launcher
            print(recipe_yaml(opts, given), end="")
        return 0
    # torch and DeepSpeed load here: --help and --print-config answer without them
    from lvm.train.trainer import USER_ERRORS, train

    try:
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
