#!/usr/bin/env python
"""Start-up memory of one rank under ZeRO-1/2: building the model, and building it for `--init-from`.

Each case runs in a fresh process (one rank; no process group is needed for this part) and reports
its peak resident memory (VmHWM from /proc/self/status) above what the process held before the model
(interpreter, torch, transformers: VmRSS just before the build), against the bytes of the parameters
and buffers the rank must hold. Cases:
- `eager (before)`: what `build_model` did before it built on the meta device: the whole fp32 model
  created and randomly initialised on the host (DeepSpeed then casts it to the compute dtype);
- `meta`: `lvm.train.engine.build_model` now: built on the meta device, materialised once in the
  compute dtype and initialised there;
- `init-from ...`: the same followed by `lvm.train.init_from.load_weights` of a saved HF folder (bf16
  safetensors, as LVM's released weights), the model left uninitialised until the folder fills it.
Only model build + weight load are measured (no DeepSpeed engine, optimizer or training step): that is
what start-up costs on the host; the optimizer's own state is planned by `lvm.plan`.

On a CPU the compute dtype is fp32 (what a CPU run trains in); the bf16 rows are what a GPU rank
would hold, materialised on the host here only to measure it (on a GPU rank it lies on the device).

    python bench/bench_startup.py --model 1b
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(case: str, model: str, dtype_name: str, folder: str | None) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from lvm.model.presets import llama_config
    from lvm.train import init_from
    from lvm.train.engine import build_model

    dtype = getattr(torch, DTYPES[dtype_name])
    cfg = init_from.read_config(folder, 256) if folder else llama_config(model, 256)
    ds = {"zero_optimization": {"stage": 2}}
    # warm-up: whatever transformers imports or caches at a first build is not the model's memory
    build_model(llama_config("tiny", 256), ds, False, "sdpa", device="cpu", dtype=dtype)
    with torch.device("meta"):
        LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    torch.manual_seed(0)
    reset_hwm()
    base = status_kib("VmRSS")
    t = time.perf_counter()
    if case == "eager":
        m = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
        if folder:  # the loader before: safe_open, get_tensor one at a time (through its memory map)
            from safetensors import safe_open

            params = dict(m.named_parameters())
            with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as st, torch.no_grad():
                for k in st.keys():
                    params[k].copy_(st.get_tensor(k))
        # DeepSpeed casts the parameters to the compute dtype (one at a time)
        for p in m.parameters():
            p.data = p.data.to(dtype)
    else:
        m, _ = build_model(cfg, ds, False, "sdpa", device="cpu", dtype=dtype, init=folder is None)
        if folder:
            init_from.load_weights(m, folder, 0)
    seconds = time.perf_counter() - t
    held = sum(p.numel() * p.element_size() for p in m.parameters()) + sum(b.numel() * b.element_size() for b in m.buffers())
    return {"base_kib": base, "hwm_kib": status_kib("VmHWM"), "held_bytes": held, "seconds": seconds,
            "params": sum(p.numel() for p in m.parameters())}


def run_case(case: str, model: str, dtype: str, folder: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", case, "--model", model, "--dtype", dtype]
    if folder:
        cmd += ["--folder", str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "DS_ACCELERATOR": "cpu"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{case} {dtype}: failed\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def save_folder(model: str, out: Path) -> None:
    """A saved HF LlamaForCausalLM folder of the preset, bf16 safetensors (one file), random weights."""
    import torch

    from lvm.model.presets import llama_config
    from lvm.train.engine import build_model

    torch.manual_seed(1)
    m, _ = build_model(llama_config(model, 256), {"zero_optimization": {"stage": 2}}, False, device="cpu", dtype=torch.bfloat16)
    m.save_pretrained(out, max_shard_size="100GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b")
    ap.add_argument("--dtypes", default="fp32,bf16", help="compute dtypes to measure (fp32: the CPU path)")
    ap.add_argument("--folder", help="an existing HF folder for the init-from rows (default: one saved here)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.dtype, a.folder)), flush=True)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import print_table

    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = Path(a.folder) if a.folder else Path(tmp) / f"hf-{a.model}"
        if not a.folder:
            t = time.perf_counter()
            save_folder(a.model, folder)
            print(f"saved {folder} (bf16 safetensors) in {time.perf_counter() - t:.1f}s", flush=True)
        for dtype in a.dtypes.split(","):
            for case, label, f in (("eager", "eager (before)", None), ("meta", "meta", None),
                                   ("eager", "init-from, eager (before)", folder), ("meta", "init-from, meta", folder)):
                r = run_case(case, a.model, dtype, f)
                gib = 1024**3
                peak = (r["hwm_kib"] - r["base_kib"]) * 1024
                rows.append([label, dtype, f"{r['params'] / 1e9:.3f}B", r["held_bytes"] / gib, r["base_kib"] * 1024 / gib,
                             r["hwm_kib"] * 1024 / gib, peak / gib, f"{peak / r['held_bytes']:.2f}x", r["seconds"]])
                print(rows[-1], flush=True)
    print_table(f"Start-up of one ZeRO-2 rank, --model {a.model} (model build + weight load; CPU, 1 process)",
                ["case", "dtype", "params", "must hold GiB", "before GiB", "VmHWM GiB", "peak - before GiB", "ratio", "seconds"],
                rows)


if __name__ == "__main__":
    main()
