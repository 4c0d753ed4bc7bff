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

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

try:
    import numpy as np
except ImportError:  # reported by no_gpu_reason with the rest of what is missing
    np = None

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from common import print_table  # noqa: E402

try:
    from lvm.eval.learning import CPU_RECIPE, GPU_RECIPE, Recipe
except ImportError:  # reported by no_gpu_reason with the rest of what is missing
    CPU_RECIPE = GPU_RECIPE = Recipe = None

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
GIB = 2**30


@dataclass
class Sizes:
    """What each step runs; `smoke` shrinks everything to check the plumbing on a CPU."""

    models: tuple = (("300m", 4), ("1b", 2))  # (preset, micro-batch) of the throughput runs
    seq: int = 4096
    steps: int = 20
    log_every: int = 10
    corpus_videos: int = 800
    corpus_frames: int = 8
    learn: Recipe = GPU_RECIPE
    precision: str = "bf16"
    workers: int = 8
    options: tuple = ("sdpa", "flash_attention_2", "liger", "compile", "all")
    packing_model: str = "100m"


SMOKE = Sizes(models=(("tiny", 2),), seq=512, steps=4, log_every=2, corpus_videos=40, learn=CPU_RECIPE.scaled(1, 4), precision="fp32", workers=2, options=("sdpa",),
              packing_model="tiny")


@dataclass
class Report:
    rows: list = field(default_factory=list)  # [section, measure, value, note]
    data: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)

    def row(self, section: str, measure: str, value: str, note: str = "") -> None:
        self.rows.append([section, measure, value, note])
        print(f"[gpu-check] {section} | {measure} | {value} | {note}", flush=True)

    def fail(self, section: str, measure: str, why: str) -> None:
        self.failed.append(f"{section}: {measure}")
        self.row(section, measure, "failed", why[:200])


# import name -> distribution, for what every step needs (liger-kernel and flash-attn are optional rows)
NEEDED = {"numpy": "numpy", "torch": "torch", "deepspeed": "deepspeed", "transformers": "transformers", "av": "av",
          "braceexpand": "braceexpand", "pyarrow": "pyarrow", "datasets": "datasets", "lvm": "lvm-pretrain"}


def no_gpu_reason() -> str | None:
    missing = [dist for mod, dist in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        return (f"{sys.executable} lacks {', '.join(missing)}: on a machine with an index run "
                "`make gpu-wheels HAVE=<this machine's pip freeze>` and copy wheels/gpu here (see launch/wheelhouse.py)")
    import torch

    if not torch.cuda.is_available():
        return ("make gpu-check needs a CUDA GPU and none is visible here (torch.cuda.is_available() is False); "
                "run it on a GPU machine")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose output lines are kept (and logged to a file) as they come."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.lines: queue.Queue = queue.Queue()
        self.out: list[str] = []
        self.t0 = time.perf_counter()
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log.open("w")
        self.log.write("$ " + " ".join(cmd) + "\n")
        self.p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.log.write(line)
            self.log.flush()
            self.out.append(line.rstrip("\n"))
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next output line; '' when none came within `timeout`; None at the end of the output."""
        try:
            return self.lines.get(timeout=max(timeout, 0.01))
        except queue.Empty:
            return ""

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            rc = self.p.wait()
        self.reader.join(timeout=5)
        self.log.close()
        return rc

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def tail(self, n: int = 3) -> str:
        return " / ".join(x.strip() for x in self.out[-n:] if x.strip())


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, float, Proc]:
    p = Proc(cmd, log, env)
    rc = p.wait(timeout)
    return rc, p.seconds(), p


# ---------------------------------------------------------------------------------------------- data
def random_source(folder: Path, sentences: int, frames: int = 16, seed: int = 0) -> Path:
    """A training source of random video sentences (throughput only), with the tokenizer.json training reads."""
    from lvm.data.shards import write_shard

    rng = np.random.default_rng(seed)
    rows = [{"tokens": rng.integers(0, 8192, 256 * frames, dtype=np.uint16), "n_images": frames, "kind": "video",
             "id": f"random-{i}"} for i in range(sentences)]
    write_shard(folder / "train" / "random-00000.arrow", rows)
    (folder / "tokenizer.json").write_text(json.dumps({"spec": "random", "kind": "random", "codebook_size": 8192,
                                                      "image_size": 256, "tokens_per_image": 256,
                                                      "details": {"kind": "random tokens (throughput only)"}}))
    return folder


def _write_videos(job: tuple) -> int:
    root, indices, seed, frames = job
    from lvm.data.synth import background, random_shapes, render, write_video

    for i in indices:
        rng = np.random.default_rng([seed, i])
        bg, shapes = background(rng), random_shapes(rng, moving=True)
        write_video([render(bg, shapes, t)[0] for t in range(frames)], Path(root) / "videos" / f"clip_{i:05d}.mp4")
    return len(indices)


def video_corpus(root: Path, n: int, workers: int, seed: int = 0, frames: int = 16) -> Path:
    """n synthetic videos (moving, rotating shapes on textured backgrounds: `lvm.data.synth`), and their manifest."""
    from lvm.data.offline.sources.manifest import manifest_from_tree, write_manifest

    (root / "videos").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), list(range(k, n, workers)), seed, frames) for k in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        assert sum(pool.map(_write_videos, jobs)) == n
    write_manifest(manifest_from_tree(root), root / "manifest.jsonl")
    return root / "manifest.jsonl"


# ---------------------------------------------------------------------------------------------- 1 + 3
def option_flags(option: str, have_flash: bool, have_liger: bool) -> list[str] | None:
    """pretrain.py flags of an option; None when it is not available here."""
    attention = ["--attention", "flash_attention_2" if have_flash else "sdpa"]
    if option == "sdpa":
        return ["--attention", "sdpa"]
    if option == "flash_attention_2":
        return ["--attention", "flash_attention_2"] if have_flash else None
    if option == "liger":
        return [*attention, "--kernels", "liger"] if have_liger else None
    if option == "compile":
        return [*attention, "--compile"]
    if option == "all":
        flags = [*attention, "--compile"] + (["--kernels", "liger"] if have_liger else [])
        return flags if (have_flash or have_liger) else None  # else the same as "compile"
    raise ValueError(option)


def describe_option(flags: list[str]) -> str:
    parts = [flags[flags.index("--attention") + 1]]
    if "--kernels" in flags:
        parts.append("liger")
    if "--compile" in flags:
        parts.append("compile")
    return " + ".join(parts)


def throughput_run(model: str, micro: int, flags: list[str], data: Path, out: Path, sz: Sizes, timeout: float) -> dict:
    """One pretrain.py run; stopped once its last step is logged. The trainer's own numbers of its last window."""
    import shutil

    run_dir = out / "runs" / f"{model}-{describe_option(flags).replace(' + ', '-')}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "launch/pretrain.py", "--model", model, "--data", str(data), "--output", str(run_dir),
           "--ds_config", "ds_configs/zero2.json", "--seq-len", str(sz.seq), "--micro-batch", str(micro),
           "--grad-accum", "1", "--max-steps", str(sz.steps), "--lr-schedule", "constant", "--warmup-steps", "0",
           "--lr", "1e-4", "--log-every", str(sz.log_every), "--eval-every", "0", "--save-every", str(10**9),
           "--resume", "none", "--precision", sz.precision, *flags]
    p = Proc(cmd, out / "logs" / f"{run_dir.name}.log", {"MASTER_PORT": str(free_port())})
    deadline = time.perf_counter() + timeout
    last = f"step {sz.steps}/{sz.steps} "
    done = False
    while time.perf_counter() < deadline:
        line = p.next_line(deadline - time.perf_counter())
        if line is None:
            break
        if last in line:  # the last window is in metrics.jsonl (written before the console line)
            done = True
            break
    p.signal(signal.SIGKILL)  # the end-of-training checkpoint is not part of the measurement
    p.wait(30)
    rows = []
    if (run_dir / "metrics.jsonl").is_file():
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("split") == "train"]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    notes = [x.split("] ", 1)[-1] for x in p.out if "] attention:" in x or "] kernels:" in x or "] compile:" in x
             or "--attention" in x or "--kernels" in x or "--compile" in x]
    if not done or not rows:
        return {"ok": False, "why": p.tail() if p.p.returncode not in (None, -signal.SIGKILL) else "no last step within the time limit",
                "seconds": p.seconds()}
    r = rows[-1]
    return {"ok": True, "tokens_per_s": r.get("tokens_per_s"), "mfu": r.get("mfu"), "tflops_per_s": r.get("tflops_per_s"),
            "max_allocated": (r.get("memory_gib") or 0) * GIB, "max_reserved": (r.get("memory_reserved_gib") or 0) * GIB,
            "loss": r.get("loss"), "windows": [(x["step"], x.get("tokens_per_s"), x.get("mfu")) for x in rows],
            "notes": notes, "seconds": p.seconds()}


def planned_memory(model: str, micro: int, seq: int, attention: str, dtype: str) -> tuple[float, float]:
    from bench_plan import planned

    plan = planned({"stage": 2, "ckpt": False, "micro_batch": micro, "packing": "concat", "attention": attention}, model, seq, dtype)
    return plan.memory.allocated, plan.memory.reserved


def step_throughput(rep: Report, out: Path, sz: Sizes, deadline: float, cuda: bool) -> None:
    import torch

    from lvm.model.attention import flash_attn_unavailable

    # a flash-attn that installs but cannot run (built for another torch) would make the row measure sdpa
    flash_why = flash_attn_unavailable(torch.device("cuda" if cuda else "cpu"), torch.bfloat16) if cuda else "no GPU"
    have_flash = flash_why is None
    have_liger = importlib.util.find_spec("liger_kernel") is not None
    rep.data["installed"] = {"flash_attn": have_flash, "liger_kernel": have_liger}
    data = random_source(out / "random_tokens", sentences=64 if cuda else 8)
    combos = []  # (model, micro, option, flags): the sdpa and fastest runs of each model first
    first = [o for o in ("sdpa", "all" if option_flags("all", have_flash, have_liger) else "compile") if o in sz.options]
    for model, micro in sz.models:
        for option in first:
            combos.append((model, micro, option, option_flags(option, have_flash, have_liger)))
    for model, micro in sz.models:
        for option in sz.options:
            flags = option_flags(option, have_flash, have_liger)
            if option not in first and flags is not None:
                combos.append((model, micro, option, flags))
    for option in sz.options:
        if option_flags(option, have_flash, have_liger) is None:
            why = {"flash_attention_2": f"flash-attention-2 cannot run: {flash_why}", "liger": "liger-kernel is not installed",
                   "all": "neither flash-attn nor liger-kernel is installed (same as compile)"}[option]
            rep.row("1 train", f"option {option}", "n/a", why)
    results = rep.data.setdefault("throughput", [])
    per_run = 240.0 if cuda else 600.0
    for model, micro, option, flags in combos:
        label = f"{model}, {describe_option(flags)}, micro {micro}"
        if time.perf_counter() + 45 > deadline:
            rep.row("1 train", label, "skipped", "time budget spent")
            continue
        r = throughput_run(model, micro, flags, data, out, sz, min(per_run, deadline - time.perf_counter()))
        r.update(model=model, micro=micro, option=option, flags=flags)
        results.append(r)
        if not r["ok"]:
            rep.fail("1 train", label, r["why"])
            continue
        mfu = f"MFU {r['mfu']:.1%}" if r.get("mfu") is not None else "MFU n/a (no bf16 peak)"
        goal = "; goal MFU >= 50%" if model == "1b" else ""
        rep.row("1 train", f"{label}, seq {sz.seq}, {sz.precision}, ZeRO-2",
                f"{r['tokens_per_s']:,.0f} tok/s", f"{mfu}, {r['tflops_per_s']:.0f} TFLOP/s{goal}; " + "; ".join(r["notes"])[:160])
        if cuda:
            attention = "flash_attention_2" if "flash_attention_2" in flags else "sdpa"
            pa, pr = planned_memory(model, micro, sz.seq, attention, sz.precision)
            r.update(planned_allocated=pa, planned_reserved=pr)
            ea, er = pa / r["max_allocated"] - 1, pr / r["max_reserved"] - 1
            rep.row("3 memory", label, f"planned {pa / GIB:.2f} / measured {r['max_allocated'] / GIB:.2f} GiB allocated",
                    f"{ea:+.1%}; reserved planned {pr / GIB:.2f} / measured {r['max_reserved'] / GIB:.2f} GiB ({er:+.1%}); goal within 10%")


# ---------------------------------------------------------------------------------------------- packing
def packing_proof(model, b, impl: str, dtype, device) -> dict:
    """Logits of every sentence of the packed micro-batch `b` vs the sentence run alone, under `impl`:

    - `max_abs_diff`: with the packing passed as training passes it (`packed_attention_kwargs`): must be within `bound`;
    - `control`: the same rows without any packing (no mask or varlen arguments, no restarting position ids: plain
      causal attention over the row), over the sentences after the first of their row (the first attends to itself
      only, packed or not): must exceed `bound`, else the comparison could not tell packed sentences that leak from
      ones that do not (a model whose positions never mix would pass anything);
    - `guess` (flash_attention_2 only, informative): position ids without the varlen arguments, transformers' own
      detection of packing, which it makes for flash-attention only when the micro-batch has one row.

    The bound is 2% of the largest packed logit (bf16: masked and unmasked kernels round differently)."""
    import torch

    from lvm.model.attention import packed_attention_kwargs
    from lvm.model.vocab import BOS_ID, EOS_ID

    ids, pos = b.input_ids.to(device), b.position_ids.to(device)
    worst, control, guess, n, later = 0.0, 0.0, None, 0, 0
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False, **packed_attention_kwargs(pos, impl, dtype)).logits
        plain = model(input_ids=ids, use_cache=False).logits
        guessed = model(input_ids=ids, position_ids=pos, use_cache=False).logits if impl == "flash_attention_2" else None
        for r in range(ids.shape[0]):
            row = b.input_ids[r].numpy()
            for k, s in enumerate(np.flatnonzero(row == BOS_ID)):
                e = int(s) + int(np.flatnonzero(row[s:] == EOS_ID)[0]) + 1
                alone = model(input_ids=ids[r : r + 1, s:e], use_cache=False).logits[0]
                worst = max(worst, float((packed[r, s:e] - alone).abs().max()))
                if k:
                    control = max(control, float((plain[r, s:e] - alone).abs().max()))
                    later += 1
                    if guessed is not None:
                        guess = max(guess or 0.0, float((guessed[r, s:e] - alone).abs().max()))
                n += 1
    scale = float(packed.abs().max())
    bound = max(0.02 * scale, 1e-4)
    return {"max_abs_diff": worst, "control": control, "guess": guess, "sentences": n, "later_sentences": later,
            "scale": scale, "bound": bound, "equal": worst <= bound, "control_leaks": later > 0 and control > bound}


def step_packing(rep: Report, out: Path, cuda: bool, preset: str = "100m") -> None:
    """Packed sentences stay apart on this device: for each attention implementation that runs here, the logits
    of every sentence of a packed micro-batch of 3 rows equal those of the sentence run alone, and, as a control,
    differ without the packing (`packing_proof`). Both are asserted."""
    import torch
    from transformers import LlamaForCausalLM

    from lvm.data.mixture import DistributedLoader
    from lvm.data.packing import SourceWindows
    from lvm.data.shards import open_shards, write_shard
    from lvm.model.attention import flash_attn_unavailable
    from lvm.model.presets import llama_config

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rng = np.random.default_rng(3)
    folder = out / "packing"
    rows = [{"tokens": rng.integers(0, 8192, 256 * k, dtype=np.uint16), "n_images": k, "kind": "video", "id": f"s{i}"}
            for i, k in enumerate([1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 2])]
    write_shard(folder / "part-000.arrow", rows)
    b = DistributedLoader(SourceWindows(open_shards(folder), 800, "sentence", seed=0), micro_batch=3).next_batch()
    impls = ["sdpa"] + (["flash_attention_2"] if flash_attn_unavailable(device, dtype) is None else [])
    for impl in impls:
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(llama_config(preset, 800), attn_implementation=impl).to(device, dtype).eval()
        r = packing_proof(model, b, impl, dtype, device)
        if not (r["equal"] and r["control_leaks"]):
            rep.failed.append(f"packing under {impl}")
        note = (f"{'equal' if r['equal'] else 'NOT equal'} (bound 2% of the largest logit, {r['scale']:.1f}); "
                f"{r['sentences']} sentences in 3 rows; control without the packing: {r['control']:.3f} over "
                f"{r['later_sentences']} later sentences, "
                + ("leaks as it must" if r["control_leaks"] else "control does not leak: the comparison shows nothing"))
        if r["guess"] is not None:
            note += f"; position ids without the varlen arguments: {r['guess']:.3f} (transformers' guess, micro-batch > 1)"
        rep.row("0 packing", f"packed sentences vs each alone, {impl}, {str(dtype).removeprefix('torch.')}",
                f"max |diff| {r['max_abs_diff']:.4f}", note)
        rep.data.setdefault("packing", {})[impl] = {k: v for k, v in r.items() if k not in ("equal", "control_leaks")}
        del model


# ---------------------------------------------------------------------------------------------- 6
def rng_resume_check(device) -> dict:
    """The generators after a resume draw what they drew when saved, on `device` (`lvm.train.checkpoint`):

    - `equal`: seed, `gather_rng_states()` (one process: `{"ranks": [rng_state()]}`), draw (on `device`, torch's
      CPU generator, Python's, NumPy's), `set_rng_state(saved, rank=0)`, draw again: the same numbers;
    - `control_differs`: a third draw without restoring differs (the comparison can tell);
    - `rank1_equal`: rank 1's entry of a 2-rank state restored by a process that sees one device (its device 0);
    - `old_format_equal`: a state of the older format (every device the saving process saw, by index, here one
      index more than this process has) restores this device's entry without touching the missing one;
    - `current_only`: on CUDA, `rng_state()` holds one tensor (the current device's), not a list."""
    import random

    import torch

    from lvm.train.checkpoint import gather_rng_states, rng_state, set_rng_state

    cuda = device.type == "cuda"

    def draw():
        return torch.rand(64, device=device).cpu(), torch.rand(4), random.random(), float(np.random.rand())

    def same(a, b):
        return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]

    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    saved = gather_rng_states()
    first = draw()
    set_rng_state(saved, rank=0)
    again = draw()
    third = draw()
    other = rng_state()  # rank 0's state in a 2-rank checkpoint
    draw()
    mine = rng_state()  # rank 1's: another point of the same streams
    drawn = draw()
    set_rng_state({"ranks": [other, mine]}, rank=1)
    rank1 = draw()
    old = rng_state()
    if cuda:
        here = torch.cuda.current_device()
        old["cuda"] = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())]
        old["cuda"].append(old["cuda"][here].clone())  # a device index this process does not have
    before = draw()
    set_rng_state(old, rank=0)
    after = draw()
    return {"equal": same(first, again), "control_differs": not torch.equal(third[0], first[0]),
            "rank1_equal": same(drawn, rank1), "old_format_equal": same(before, after),
            "current_only": (not cuda) or torch.is_tensor(saved["ranks"][0]["cuda"])}


def fused_adamw_resume_check(device) -> dict:
    """torch's fused AdamW steps after a universal-checkpoint load (`lvm.train.elastic.place_optimizer_state`):
    two copies of a small model on `device`, each with AdamW(fused=True), take a step; every state tensor of the
    second is moved to the CPU (what DeepSpeed's universal loader gives back), `place_optimizer_state` puts them
    back, and both take a second step. Asserted: `step` (float32) and the moments are on the parameter's
    device, `step` counts 2, and the resumed copy's parameters equal the uninterrupted copy's."""
    import torch

    from lvm.train.elastic import place_optimizer_state

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device)
    b = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device)
    b.load_state_dict(a.state_dict())
    oa, ob = (torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (a, b))
    x = torch.randn(16, 32, device=device)

    def step(m, o):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()

    step(a, oa)
    step(b, ob)
    for state in ob.state.values():
        for k, v in list(state.items()):
            if torch.is_tensor(v):
                state[k] = v.cpu()
    place_optimizer_state(ob)
    placed = [(str(p.device), str(s["step"].device), str(s["step"].dtype).removeprefix("torch."),
               str(s["exp_avg"].device)) for p, s in ob.state.items()]
    step(a, oa)
    step(b, ob)
    states = list(ob.state.items())
    return {"placed": placed[0] if placed else None, "params": len(states),
            "on_device": bool(states) and all(s["step"].device == p.device and s["step"].dtype == torch.float32
                                              and s["exp_avg"].device == p.device == s["exp_avg_sq"].device
                                              for p, s in states),
            "steps": sorted({float(s["step"]) for _, s in states}),
            "same_as_uninterrupted": all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))}


def compile_check(device, backend="inductor", preset: str = "tiny") -> dict:
    """`compile_layers` (`lvm.model.kernels`) on a `preset` model on `device` (bf16 on CUDA), ZeRO-2 as training
    here runs it; one training forward and backward. `said`: the lines it reported (one: compiled at the first
    forward, or fell back to eager); `compiled`: it said the layers compiled; `loss_diff`: |loss compiled - eager|."""
    import torch
    import torch._dynamo
    from transformers import LlamaForCausalLM

    from lvm.model.kernels import compile_layers
    from lvm.model.presets import llama_config

    torch._dynamo.reset()  # compile afresh: the first forward is the one that says
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = llama_config(preset, 256)
    torch.manual_seed(0)
    eager = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").to(device, dtype)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").to(device, dtype)
    model.load_state_dict(eager.state_dict())
    said: list[str] = []
    setup = compile_layers(model, zero_stage=2, report=said.append, backend=backend)
    ids = torch.randint(0, cfg.vocab_size, (2, 128), device=device)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    with torch.no_grad():
        ref = eager(input_ids=ids, labels=ids, use_cache=False).loss
    ok = len(said) == 1 and said[0].startswith("compile: the ") and "compiled at the first forward" in said[0]
    return {"setup": setup, "said": said, "compiled": ok, "loss_diff": abs(float(loss.detach()) - float(ref)),
            "dtype": str(dtype).removeprefix("torch.")}


def error_line(e: BaseException) -> str:
    first = next((x.strip() for x in str(e).splitlines() if x.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def step_fixes(rep: Report, cuda: bool, compile_backend="inductor") -> None:
    """One row for each fix that only a GPU shows: the CUDA generator restored on resume, fused AdamW stepping
    after a universal-checkpoint load, and torch.compile of the decoder layers compiling (not falling back).
    Without a GPU (--smoke) each runs its CPU part: the row says what it did not check."""
    import torch

    device = torch.device("cuda" if cuda else "cpu")
    cpu_only = "" if cuda else "no GPU (--smoke): "
    data = rep.data.setdefault("fixes", {})

    measure = "RNG state on resume: CUDA generator restored (rank 0; rank 1 on device 0; older per-device state)"
    try:
        r = data["rng"] = rng_resume_check(device)
        if not cuda:
            measure = measure.replace("CUDA generator", "CPU generators")
        checks = {"restored draws equal": r["equal"], "control differs": r["control_differs"],
                  "rank 1's entry onto this device": r["rank1_equal"],
                  "older state with a device index not here": r["old_format_equal"],
                  "only the current device saved": r["current_only"]}
        bad = [k for k, v in checks.items() if not v]
        if bad:
            rep.fail("6 resume", measure, "NOT: " + "; ".join(bad))
        else:
            rep.row("6 resume", measure, "equal", cpu_only + "draws after set_rng_state equal those after the save "
                    "(torch " + ("CUDA, " if cuda else "") + "CPU, Python, NumPy); without restoring they differ; "
                    "an older state with an entry for a device index not here restores without error"
                    + ("" if cuda else "; the CUDA generator is checked by make gpu-check on a GPU"))
    except Exception as e:
        rep.fail("6 resume", measure, error_line(e))

    measure = "fused AdamW after a universal-checkpoint load (state moved to the CPU, place_optimizer_state)"
    try:
        r = data["fused_adamw"] = fused_adamw_resume_check(device)
        checks = {"step and moments on the parameter's device (step float32)": r["on_device"],
                  "step counts 2": r["steps"] == [2.0],
                  "parameters equal the uninterrupted copy's": r["same_as_uninterrupted"]}
        bad = [k for k, v in checks.items() if not v]
        where = "step on {1} ({2}), exp_avg on {3}, parameter on {0}".format(*r["placed"]) if r["placed"] else ""
        if bad:
            rep.fail("6 resume", measure, "NOT: " + "; ".join(bad) + f" ({where})")
        else:
            rep.row("6 resume", measure, "stepped", cpu_only + f"{where}; the second step equals the uninterrupted "
                    f"optimizer's over {r['params']} parameters"
                    + ("" if cuda else "; on the CPU the state is on the parameter's device either way: the move "
                       "back to the GPU is checked by make gpu-check"))
    except Exception as e:
        rep.fail("6 resume", measure, error_line(e))

    measure = f"--compile: decoder layers of the tiny model at the first forward ({device.type})"
    try:
        r = data["compile"] = compile_check(device, compile_backend)
        line = " / ".join(r["said"]) or f"nothing reported at the first forward ({r['setup']})"
        if r["compiled"]:
            rep.row("6 compile", measure, "compiled", f"{cpu_only}{line}; |loss - eager| {r['loss_diff']:.2e} ({r['dtype']})")
        else:  # a fallback on the GPU is a finding
            rep.fail("6 compile", measure, f"fell back: {line}")
    except Exception as e:
        rep.fail("6 compile", measure, error_line(e))


# ---------------------------------------------------------------------------------------------- 2
def step_encode_and_shards(rep: Report, out: Path, sz: Sizes, cuda: bool) -> tuple[Path, Path] | None:
    """VQGAN encode rate; the learning corpus and `make shards` on it. (shards, manifest) or None."""
    if cuda:
        try:
            from bench_webdataset import gpu_vqgan_row

            measure, value, note = gpu_vqgan_row()
            rep.row("2 offline", measure, value, note)
        except Exception as e:  # noqa: BLE001 - the table says what broke, the other steps go on
            rep.fail("2 offline", "VQGAN bf16 encode", f"{type(e).__name__}: {e}")
    corpus = out / "video_corpus"
    shards = out / "video_shards"
    import shutil

    shutil.rmtree(shards, ignore_errors=True)
    t = time.perf_counter()
    manifest = video_corpus(corpus, sz.corpus_videos, max(2, min(16, os.cpu_count() or 2)), frames=sz.corpus_frames)
    rep.row("2 offline", f"synthetic video corpus ({sz.corpus_videos} videos x {sz.corpus_frames} frames)", f"{time.perf_counter() - t:.1f} s",
            "lvm.data.synth shapes, libx264")
    cmd = ["make", "-o", "venv", "-o", ".venv/.installed", "shards", f"PY={sys.executable}", f"INPUT={manifest}",
           f"SHARDS={shards}", f"WORKERS={sz.workers}"]
    rc, dt, p = run(cmd, out / "logs" / "make_shards.log", timeout=600)
    if rc != 0 or not (shards / "report.json").is_file():
        rep.fail("2 offline", "make shards", p.tail())
        return None
    report = json.loads((shards / "report.json").read_text())
    w = report["written"]
    images = w["train"]["images"] + w["val"]["images"]
    device = "cuda" if cuda else "cpu"
    rep.row("2 offline", f"make shards end to end (fit patch-kmeans, encode on {device})", f"{images / dt:,.0f} img/s",
            f"{images} images in {dt:.1f} s; {w['val']['sentences']} held-out videos; {sz.workers} decode workers")
    rep.data["shards"] = {"images": images, "seconds": dt, "val_sentences": w["val"]["sentences"]}
    return shards, manifest


# ---------------------------------------------------------------------------------------------- 4 + 5
def step_learn_eval_generate(rep: Report, out: Path, sz: Sizes, shards: Path, manifest: Path, cuda: bool) -> None:
    """The demo's learning proof with the demo's recipe scaled to the GPU (`lvm.eval.learning.GPU_RECIPE`): train,
    evaluate the context curve, generate the next frame of a held-out clip with and without its first frames; the
    demo's checks are asserted (with --smoke they are reported only: a few CPU steps learn nothing)."""
    import shutil

    import torch

    recipe = sz.learn
    run_dir = out / "runs" / "learn"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "launch/pretrain.py", *recipe.pretrain_flags(str(shards), str(run_dir)), "--resume", "none",
           "--precision", sz.precision]
    rc, dt, p = run(cmd, out / "logs" / "learn.log", timeout=900, env={"MASTER_PORT": str(free_port())})
    rows = [r for r in read_rows(run_dir / "metrics.jsonl") if r.get("split") == "train" and r.get("loss") is not None]
    if rc != 0 or not rows:
        rep.fail("5 learning", f"{recipe.model} training", p.tail())
        return
    tps = [r["tokens_per_s"] for r in rows[1:]] or [rows[-1]["tokens_per_s"]]
    rep.row("5 learning", f"{recipe.model} on the video corpus: the demo's recipe, seq {recipe.seq_len}, micro {recipe.micro_batch}, "
            f"lr {recipe.lr:g} cosine to {recipe.lr * recipe.final_lr_ratio:g}", f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}",
            f"{rows[-1]['step']} steps in {dt:.0f} s ({np.median(tps):,.0f} tok/s)")
    rep.data["learning"] = {"train": [(r["step"], r["loss"]) for r in rows], "seconds": dt}

    ev = out / "eval"
    rc, dt, pe = run([sys.executable, "launch/evaluate.py", "--checkpoint", str(run_dir), "--data", str(shards), "--split", "val",
                      "--out", str(ev), "--batch-size", "8" if cuda else "2"], out / "logs" / "evaluate.log", timeout=600)
    if rc != 0 or not (ev / "eval.json").is_file():
        rep.fail("4 eval", "launch/evaluate.py", pe.tail())
        return
    res = json.loads((ev / "eval.json").read_text())
    rep.row("4 eval", "launch/evaluate.py (held-out videos, 1 process)", f"{dt:.1f} s",
            f"perplexity {res['perplexity']:.1f} over {res['tokens']:,} tokens")
    if cuda and torch.cuda.device_count() >= 2:
        ev2 = out / "eval_2proc"
        rc, dt, p2 = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                          "launch/evaluate.py", "--checkpoint", str(run_dir), "--data", str(shards), "--split", "val",
                          "--out", str(ev2), "--batch-size", "8"], out / "logs" / "evaluate_2proc.log", timeout=600)
        if rc != 0 or not (ev2 / "eval.json").is_file():
            rep.fail("4 eval", "evaluate.py under torchrun, 2 processes", p2.tail())
        else:
            two = json.loads((ev2 / "eval.json").read_text())
            same = abs(two["perplexity"] / res["perplexity"] - 1) < 1e-3
            rep.row("4 eval", "launch/evaluate.py under torchrun, 2 GPUs", f"{dt:.1f} s",
                    f"perplexity {two['perplexity']:.2f} ({'equals' if same else 'DIFFERS from'} 1 process)")
    else:
        rep.row("4 eval", "launch/evaluate.py under torchrun, 2 GPUs", "n/a", "one GPU here")
    psnr = generate_with_and_without_prompt(rep, out, run_dir, shards, manifest)
    learning_verdict(rep, rows, res, shards, psnr, asserted=cuda)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def generate_with_and_without_prompt(rep: Report, out: Path, run_dir: Path, shards: Path, manifest: Path) -> tuple | None:
    """Frame PROMPT_FRAMES+1 of a held-out clip generated from its first frames and from nothing (the demo's
    sampling); (prompted, unprompted) PSNR against the tokenized truth, or None."""
    from lvm.eval.learning import PROMPT_FRAMES

    prompt = prompt_frames(shards, manifest, out / "prompt", n=PROMPT_FRAMES + 1)
    if prompt is None or len(prompt) <= PROMPT_FRAMES:
        rep.fail("4 generate", "prompt frames", f"no held-out video of more than {PROMPT_FRAMES} frames to prompt with")
        return None
    sampling = ["--seed", "0", "--temperature", "1.0", "--top-k", "100", "--num-samples", "4", "--truth", str(prompt[-1])]
    psnr = []
    for name, given in (("generated", ["--prompt", *map(str, prompt[:-1])]), ("generated_unprompted", ["--unconditional"])):
        gen = out / name
        rc, dt, pg = run([sys.executable, "launch/generate.py", "--checkpoint", str(run_dir), *given, "--out", str(gen), *sampling],
                         out / "logs" / f"{name}.log", timeout=600)
        if rc != 0 or not (gen / "generation.json").is_file():
            rep.fail("4 generate", f"launch/generate.py ({name})", pg.tail())
            return None
        psnr.append(json.loads((gen / "generation.json").read_text())["psnr_tokenized_truth"])
        rep.row("4 generate", f"launch/generate.py: frame {PROMPT_FRAMES + 1} of a held-out video, "
                + (f"from {PROMPT_FRAMES} frames" if given[0] == "--prompt" else "unprompted"), f"{dt:.1f} s",
                f"{gen / 'grid.png'}, 4 samples (includes loading the model and the tokenizer)")
    return tuple(psnr)


def learning_verdict(rep: Report, train_rows: list[dict], eval_result: dict, shards: Path, psnr: tuple | None,
                     asserted: bool) -> None:
    """The demo's checks (`lvm.eval.learning`), one row each; a failed check fails the step where `asserted`."""
    from lvm.data.shards import load_sentences
    from lvm.eval.learning import final_loss, generation_check, learning_checks
    from lvm.eval.perplexity import unigram_entropy

    curve = {int(k): v for k, v in eval_result["perplexity_by_context_frames"].items()}
    rep.data["learning"]["perplexity_by_context_frames"] = curve
    if curve:
        rep.row("5 learning", "held-out next-frame perplexity vs context frames",
                ", ".join(f"{k}: {curve[k]:.1f}" for k in sorted(curve)), "paper: 62.1 -> 48.4 from 1 to 11 frames")
    final, _ = final_loss(train_rows)
    checks = learning_checks(final, unigram_entropy(load_sentences(shards / "train")), curve)
    if psnr is not None:
        checks.append(generation_check(*psnr))
    rep.data["learning"]["checks"] = [c._asdict() for c in checks]
    for c in checks:
        if c.ok or not asserted:
            rep.row("5 learning", c.what, "yes" if c.ok else "no", "" if asserted else "--smoke: reported, not asserted")
        else:
            rep.fail("5 learning", c.what, "the demo's learning check failed on the GPU")


def prompt_frames(shards: Path, manifest: Path, folder: Path, n: int) -> list[Path] | None:
    """The first n frames of the first held-out video, as PNG files."""
    from PIL import Image

    from lvm.data.offline.decode import decode_sentence
    from lvm.data.offline.sources.manifest import read_manifest
    from lvm.data.shards import load_sentences

    val = load_sentences(shards / "val")
    ids = [str(i) for i, k in zip(val.ids, val.kinds, strict=True) if k == "video"]
    if not ids:
        return None
    sentence = next(s for s in read_manifest(manifest).sentences if s.id == ids[0])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(decode_sentence(sentence)[:n]):
        Image.fromarray(frame).save(folder / f"frame_{i}.png")
        paths.append(folder / f"frame_{i}.png")
    return paths


# ---------------------------------------------------------------------------------------------- output
def environment() -> dict:
    import deepspeed
    import torch
    import transformers

    from lvm.train.metrics import device_peak_flops

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    peak = device_peak_flops("bf16", 0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "gpus": torch.cuda.device_count(), "bf16_peak_tflops": peak / 1e12 if peak else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}


def markdown(rep: Report, env: dict, seconds: float) -> str:
    head = (f"`make gpu-check` on {env['gpu']} ({env['gpus']} visible; bf16 peak {env['bf16_peak_tflops'] or 'n/a'} TFLOP/s), "
            f"PyTorch {env['torch']} (CUDA {env['cuda']}), DeepSpeed {env['deepspeed']}, transformers {env['transformers']}, "
            f"{env['cpus']} CPUs; {seconds:.0f} s in all.")
    lines = [head, "", "| step | measure | value | note |", "| --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rep.rows]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def put_in_benchmarks(md_file: Path, table: str) -> None:
    """The table between the gpu-check markers of docs/benchmarks.md (a GPU section is added if missing)."""
    text = md_file.read_text() if md_file.is_file() else "# Benchmarks\n"
    block = f"{BEGIN}\n{table}{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## GPU check (`make gpu-check`)\n\n" + block + "\n"
    write_atomic(md_file, text)


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
