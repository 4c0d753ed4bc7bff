"""Training metrics: TensorBoard scalars, OUTPUT/metrics.jsonl, and a compact console line."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

# Dense bf16 peak TFLOP/s by GPU name (no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            if key == "H100" and "PCIe" in name:
                return 756e12
            return tflops * 1e12
    return None


def device_memory_gib() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return None


class MetricsLogger:
    """Rank 0 writes; other ranks' calls are no-ops."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            self.jsonl = (run_dir / "metrics.jsonl").open("a")
        self.t0 = time.time()

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        """One row of metrics.jsonl; numbers (and numbers inside dict values) become TensorBoard scalars."""
        if not self.enabled:
            return

        def finite(v):
            return not (isinstance(v, float) and not math.isfinite(v))

        # non-finite numbers (an overflowed gradient norm) would make metrics.jsonl invalid JSON
        metrics = {k: ({a: b for a, b in v.items() if finite(b)} if isinstance(v, dict) else v)
                   for k, v in metrics.items() if finite(v)}
        for k, v in metrics.items():
            if isinstance(v, dict):
                for a, b in v.items():
                    if isinstance(b, (int, float)):
                        self.writer.add_scalar(f"{prefix}/{k}/{a}", b, step)
            elif isinstance(v, (int, float)):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
        self.jsonl.flush()
        self.writer.flush()

    def console(self, line: str) -> None:
        if self.enabled:
            print(f"[{time.time() - self.t0:7.1f}s] {line}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
