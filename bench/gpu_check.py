#!/usr/bin/env python
"""`make gpu-check`: what only a GPU can show, in one command (about 9 minutes on one H100), one table.

    python bench/gpu_check.py [--out runs/gpu_check] [--md docs/benchmarks.md] [--budget-s 470]
    python bench/gpu_check.py --smoke      the same steps on the CPU with the tiny model and a few steps:
                                           checks this script's plumbing; its numbers mean nothing

0. Packed sentences stay apart on the GPU: for sdpa and (where installed) flash-attention-2 in bf16, the
   logits of each sentence of a packed micro-batch of 3 rows equal those of the sentence alone, and (the
   control) the same rows without the packing do not: both are asserted.
1. Training throughput and MFU of the 300m and 1b presets at seq 4096, bf16, ZeRO-2 on one GPU, for each
   attention/kernel option installed (sdpa; flash-attention-2; Liger kernels; torch.compile; all together),
   each a real `launch/pretrain.py` run on random tokens, measured by the trainer itself (its last logging
   window; the process is stopped after it, so no checkpoint is written). The sdpa and the fastest
   combination of each model run first; single options follow while the time budget lasts.
2. VQGAN encode images/s in bf16 at batch 64 (`bench_webdataset.gpu_vqgan_row`), and `make shards` end to
   end on the GPU (the learning corpus below, patch-kmeans fitted then encoded on the GPU).
3. Planned vs measured peak memory of every training run of 1 (`bench_plan.planned`: the planner's
   max_memory_allocated / max_memory_reserved for that setting vs the trainer's torch.cuda counters).
   `python bench/bench_plan.py --gpu` checks the planner's whole matrix (ZeRO-2/3 x checkpointing x micro-batch).
4. Evaluate (`launch/evaluate.py`, also under torchrun with 2 processes where 2 GPUs exist) and generate
   (`launch/generate.py`, prompted and unprompted) on the GPU, with the model of 5.
5. A learning proof: `make demo`'s recipe and checks (`lvm.eval.learning`) scaled to the GPU: the `demo` model with
   8 windows of 1024 tokens per step for 1,500 steps (20x the CPU demo's tokens) on 800 synthetic videos of 8
   frames (moving shapes; 40 held out by make_shards' split); then the demo's checks, asserted: final training loss
   >= 2 nats below the unigram entropy, held-out perplexity of the next frame with 3 context frames <= half of that
   with none and never rising with more frames, and frame 4 of a held-out clip generated from its first 3 frames
   closer (PSNR) to the truth than one generated without them (the paper: 62.1 -> 48.4 from 1 to 11 frames).
6. Three fixes only a GPU shows, one row each, asserted (the row fails otherwise):
   - RNG state on resume (`lvm.train.checkpoint`): seeded, `gather_rng_states()`, a CUDA draw, `set_rng_state(...,
     rank=0)`, the same draw again; rank 1's entry restored onto device 0 (a process that sees one GPU); an older
     state with an entry per device, one index more than this process has, restores without error;
   - fused AdamW after a universal-checkpoint load: the optimizer state moved to the CPU (what DeepSpeed's universal
     loader gives), `lvm.train.elastic.place_optimizer_state`, a second step: `step` float32 on the parameter's
     device and the parameters equal those of an optimizer never interrupted;
   - `--compile`: `lvm.model.kernels.compile_layers` on the tiny model in bf16, one forward and backward: the row
     shows the line it reported and fails when the layers fell back to eager (a finding on a GPU).
   With --smoke they run their CPU part (CPU generators, fused AdamW on the CPU, inductor's C++ path) and say so.

Writes OUT/gpu_check.json (every number), OUT/gpu_check.md (the table), and the table into
docs/benchmarks.md between the gpu-check markers. Exits 2 with one line where no GPU is visible, 1 when a
step failed (its row says why), else 0. Goals are in the notes, not in the exit code.
"""

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from common import print_table  # noqa: E402
from gpu_checks.fixes import step_fixes  # noqa: E402
from gpu_checks.learning import step_learn_eval_generate  # noqa: E402
from gpu_checks.offline import step_encode_and_shards  # noqa: E402
from gpu_checks.packing import step_packing  # noqa: E402
from gpu_checks.report import (  # noqa: E402
    SMOKE,
    Report,
    Sizes,
    environment,
    markdown,
    no_gpu_reason,
    put_in_benchmarks,
    write_atomic,
)
from gpu_checks.throughput import step_throughput  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check", help="folder for logs, runs, the corpus and gpu_check.json/.md")
    p.add_argument("--md", default="docs/benchmarks.md", help="markdown file that receives the table (between markers)")
    p.add_argument("--budget-s", type=float, default=470.0, help="wall-clock budget; late throughput rows are skipped")
    p.add_argument("--smoke", action="store_true", help="every step on the CPU, tiny sizes: checks the plumbing only")
    a = p.parse_args(argv)
    why = None if a.smoke else no_gpu_reason()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    sz = SMOKE if a.smoke else Sizes()
    cuda = not a.smoke
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rep = Report()
    env = environment()
    rep.data["environment"] = env
    deadline = t0 + a.budget_s
    # the learning proof has a fixed length; the throughput runs take what is left of the budget, the sdpa and
    # fastest run of each model first
    step_packing(rep, out, cuda, sz.packing_model)
    step_fixes(rep, cuda)
    made = step_encode_and_shards(rep, out, sz, cuda)
    if made is not None:
        step_learn_eval_generate(rep, out, sz, *made, cuda)
    step_throughput(rep, out, sz, deadline, cuda)
    seconds = time.perf_counter() - t0
    rep.rows.sort(key=lambda r: r[0][0])  # by step number (the steps run in another order: see main)
    rep.data.update(rows=rep.rows, failed=rep.failed, seconds=seconds, smoke=a.smoke)
    write_atomic(out / "gpu_check.json", json.dumps(rep.data, indent=2, default=str))
    table = markdown(rep, env, seconds)
    write_atomic(out / "gpu_check.md", table)
    print_table(f"GPU check on {env['gpu']} ({seconds:.0f} s)", ["step", "measure", "value", "note"], rep.rows)
    if not a.smoke:
        put_in_benchmarks(REPO / a.md if not Path(a.md).is_absolute() else Path(a.md), table)
        print(f"wrote {out / 'gpu_check.json'}, {out / 'gpu_check.md'} and the GPU section of {a.md}")
    else:
        print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} (smoke run: {a.md} left alone)")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
