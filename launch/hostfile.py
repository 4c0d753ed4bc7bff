#!/usr/bin/env python
"""Write a DeepSpeed hostfile (`host slots=N` per line) from a SLURM node list.

    python launch/hostfile.py --nodelist 'gpu[01-04,07],cpu-a[1-2]' --slots 8 -o hostfile
Defaults come from SLURM_JOB_NODELIST and SLURM_GPUS_ON_NODE; prints to stdout unless -o is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lvm.launch_env import expand_nodelist


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"), help="SLURM node list (default $SLURM_JOB_NODELIST)")
    p.add_argument("--slots", type=int, default=None, help="GPUs per node (default $SLURM_GPUS_ON_NODE, else 8)")
    p.add_argument("-o", "--output", default=None, help="write here instead of stdout")
    a = p.parse_args(argv)
    if not a.nodelist:
        print("error: no node list: pass --nodelist or run inside a SLURM allocation", file=sys.stderr)
        return 2
    slots = a.slots if a.slots is not None else int(os.environ.get("SLURM_GPUS_ON_NODE", "8").split("(")[0] or 8)
    if slots < 1:
        print("error: --slots must be >= 1", file=sys.stderr)
        return 2
    try:
        hosts = expand_nodelist(a.nodelist)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = "".join(f"{h} slots={slots}\n" for h in hosts)
    if a.output:
        Path(a.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
