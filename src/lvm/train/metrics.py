"""Training metrics: TensorBoard scalars, OUTPUT/metrics.jsonl, a compact console line, and throughput.

Throughput and MFU. Tokens/s counts the tokens that are work: PAD (the tail of a packed window) is not.
Model FLOPs follow PaLM (forward + backward): 6 x the parameters that take part in a matrix product (the
input embedding is a lookup and is left out; the output head counts) per token, plus 12 x layers x
attention width for every (query, key) pair inside a segment's full square (a concatenated window is one
segment of the window's length; a packed window one segment per sentence). MFU divides by the GPU's dense
bf16/fp16 peak (`PEAK_TFLOPS`, or $LVM_PEAK_TFLOPS) times the number of GPUs; fp32 runs report none.
Validation and checkpoint time is left out of the window it falls in (`Throughput.paused`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lvm.model.vocab import IGNORE_INDEX

# Dense (no sparsity) bf16/fp16 tensor-core peak in TFLOP/s per GPU, from NVIDIA's datasheets, matched against
# torch.cuda.get_device_name() in this order (the specific names first: "H100 NVL" before "H100").
PEAK_TFLOPS: list[tuple[str, float]] = [
    (r"\bGH200\b", 989.4),
    (r"\bH200 NVL\b", 835.5),      # H200 NVL: 1,671 with sparsity
    (r"\bH200\b", 989.4),          # H200 SXM
    (r"\bH100 NVL\b", 835.5),      # H100 NVL: 1,671 with sparsity
    (r"\bH100 PCIe\b", 756.5),
    (r"\bH100\b", 989.4),          # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    (r"\bH800 PCIe\b", 756.5),
    (r"\bH800\b", 989.4),
    (r"\bB200\b", 2250.0),
    (r"\bA100\b", 312.0),          # SXM4 and PCIe, 40 and 80 GB
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.05),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
]
PEAK_ENV = "LVM_PEAK_TFLOPS"  # overrides the table (a GPU it does not know, or clocks set differently)


def peak_tflops_of(name: str, precision: str = "bf16") -> float | None:
    """Dense bf16/fp16 peak of the GPU called `name`; None for fp32 runs or a GPU not in the table."""
    if precision not in ("bf16", "fp16"):
        return None
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, name):
            return tflops
    return None


def device_peak_flops(precision: str = "bf16", device=None) -> float | None:
    """Peak FLOP/s of this process's GPU for `precision` ($LVM_PEAK_TFLOPS wins); None without a GPU."""
    if not torch.cuda.is_available():
        return None
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    t = peak_tflops_of(torch.cuda.get_device_name(device), precision)
    return t * 1e12 if t else None


def device_memory_gib() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def device_reserved_gib() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_reserved() / 2**30
    return None


def window_work(input_ids: torch.Tensor, position_ids: torch.Tensor | None, pad_id: int) -> tuple[int, int]:
    """(tokens that are not PAD, sum over segments of length squared) of a micro-batch on the host.

    Concatenated windows are one segment each (every token attends over the window: L^2); packed windows
    (`position_ids` restarting at each sentence) have one segment per sentence, and the PAD tail is none."""
    ids = input_ids.numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
    real = int((ids != pad_id).sum())
    if position_ids is None:
        return real, int(ids.shape[0]) * int(ids.shape[1]) ** 2
    pos = position_ids.numpy() if isinstance(position_ids, torch.Tensor) else np.asarray(position_ids)
    starts = pos == 0
    starts[:, 0] = True
    seg = np.cumsum(starts, axis=1) - 1                       # segment index within the row
    flat = seg + (np.arange(len(seg)) * ids.shape[1])[:, None]  # unique per row
    lengths = np.bincount(flat.ravel())
    first_ids = ids[starts]                                   # first token of each segment, row-major
    keep = lengths[lengths > 0]
    return real, int((keep[first_ids != pad_id].astype(np.int64) ** 2).sum())


def window_flops(cfg, tokens: int, sum_sq: int) -> float:
    """Training FLOPs (forward + backward) of `tokens` real tokens in segments with sum of squared lengths
    `sum_sq`: 6 x matrix-product parameters per token + 12 x layers x attention width per (query, key) pair
    of the full square of each segment (PaLM's convention; `lvm.model.presets.flops_per_token` for a window)."""
    from lvm.model.presets import attention_width, matmul_parameters

    return 6.0 * matmul_parameters(cfg) * tokens + 12.0 * cfg.num_hidden_layers * attention_width(cfg) * sum_sq


class Throughput:
    """Tokens/s and MFU over a logging window, counting only training time.

    `paused()` wraps validation and checkpointing, whose time is not training time; the clock is read
    after the device has finished its queued work (`sync`), so a window neither ends early nor hands
    its last step's kernels to the next one."""

    def __init__(self, sync=None):
        self.sync = sync or (lambda: None)
        self.reset()

    def reset(self) -> None:
        self.sync()
        self.t0 = time.perf_counter()
        self.excluded = 0.0
        self.tokens = self.window_tokens = 0
        self.flops = 0.0

    def add(self, tokens: int, window_tokens: int, flops: float) -> None:
        self.tokens += tokens
        self.window_tokens += window_tokens
        self.flops += flops

    @contextmanager
    def paused(self):
        self.sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.excluded += time.perf_counter() - t

    def read(self, peak_flops: float | None, world_size: int = 1) -> dict:
        """{tokens_per_s (non-PAD), window_tokens_per_s (PAD included), tflops_per_s, mfu or None} per job."""
        self.sync()
        dt = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        out = {"tokens_per_s": self.tokens / dt, "window_tokens_per_s": self.window_tokens / dt,
               "tflops_per_s": self.flops / dt / 1e12, "mfu": None, "seconds": dt}
        if peak_flops:
            out["mfu"] = self.flops / dt / (peak_flops * world_size)
        return out


@torch.no_grad()
def window_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL sum and target count of each window (float64), one window at a time (bounded memory).

    `targets` are already shifted (`lvm.data.windows.batch.Batch.targets`): logits[b, t] is scored against
    targets[b, t], every position, as the model's own loss does with `shift_labels`."""
    sums, counts = [], []
    for b in range(logits.shape[0]):
        target = targets[b]
        sums.append(F.cross_entropy(logits[b].float(), target, ignore_index=IGNORE_INDEX, reduction="sum"))
        counts.append((target != IGNORE_INDEX).sum())
    return torch.stack(sums).double(), torch.stack(counts).double()


class TrainMetrics:
    """The training numbers of a logging window: losses summed on the device (per source for a mixture: one
    extra cross-entropy per window), the work (tokens, window tokens, FLOPs) on the host; at each logging step
    one all-reduce, one metrics row and one console line. The host never waits for a loss between them."""

    def __init__(self, names: list[str], cfg, device, world_size: int, precision: str, max_steps: int, log):
        self.names, self.cfg, self.device, self.world_size, self.max_steps, self.log = names, cfg, device, world_size, max_steps, log
        self.peak = device_peak_flops(precision, device)
        # this rank's work; summed over the ranks at each log step (PAD is no work)
        self.throughput = Throughput(torch.cuda.synchronize if torch.cuda.is_available() else None)
        zeros = functools.partial(torch.zeros, dtype=torch.float64, device=device)
        self.loss, self.n = zeros(()), zeros(())
        self.src_nll, self.src_n = zeros(len(names)), zeros(len(names))
        self.work = [0.0, 0.0, 0.0]  # this rank's tokens, window tokens and model FLOPs since the last log

    def paused(self):
        """Validation and checkpoints: not training time."""
        return self.throughput.paused()

    def add_batch(self, b, pad_id: int) -> None:
        # the seq_len input positions of each window (a concat window's extra token is only a target)
        tokens, sum_sq = window_work(b.input_ids, b.position_ids, pad_id)
        self.work = [self.work[0] + tokens, self.work[1] + b.input_ids.numel(), self.work[2] + window_flops(self.cfg, tokens, sum_sq)]

    def add_loss(self, loss: torch.Tensor, ok: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, sources) -> None:
        """A micro-batch's mean loss (counted where finite, `ok`) and, for a mixture, each window's NLL by source."""
        self.loss += torch.where(ok, loss.detach().double(), 0.0)
        self.n += ok
        if len(self.names) > 1:
            nll, cnt = window_nll(logits.detach(), targets)
            src = sources.to(self.device)
            self.src_nll.index_add_(0, src, torch.where(ok, nll, 0.0))
            self.src_n.index_add_(0, src, torch.where(ok, cnt, 0.0))

    def log_step(self, step: int, lr: float, grad_norm, skipped_steps: int, loader) -> None:
        names = self.names
        sums = torch.cat([torch.stack([self.loss, self.n]), self.src_nll, self.src_n,
                          torch.tensor(self.work, dtype=torch.float64, device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(sums)
        total, count, *rest = sums.tolist()
        self.throughput.add(*rest[-3:])
        rest = rest[:-3]
        rate = self.throughput.read(self.peak, self.world_size)
        tps = rate["tokens_per_s"]
        loss_mean = total / count if count else None
        if len(names) > 1:
            by_source = {f"loss/{k}": a / c for k, a, c in zip(names, rest[: len(names)], rest[len(names) :], strict=True) if c}
        else:
            by_source = {f"loss/{names[0]}": loss_mean} if loss_mean is not None else {}
        epochs = loader.epochs_by_source()
        m = {"loss": loss_mean, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens_per_s": tps,
             "window_tokens_per_s": rate["window_tokens_per_s"], "tflops_per_s": rate["tflops_per_s"], "mfu": rate["mfu"],
             "memory_gib": device_memory_gib(), "memory_reserved_gib": device_reserved_gib(), "skipped_steps": skipped_steps,
             **({"epoch": loader.epoch} if len(names) == 1 else {f"epoch/{k}": v for k, v in epochs.items()}),
             **by_source, "tokens_by_source": loader.tokens_by_source()}
        self.log.log(step, {k: v for k, v in m.items() if v is not None})
        mfu = f" mfu {m['mfu']:.1%}" if m["mfu"] is not None else ""
        mem = f" mem {m['memory_gib']:.1f}GiB" if m["memory_gib"] is not None else ""
        shown = f"{loss_mean:.4f}" if loss_mean is not None else "n/a"
        if len(names) == 1:
            ep = f" epoch {loader.epoch:.2f}"
        else:
            ep = " | " + " ".join(f"{k} loss {m.get(f'loss/{k}', float('nan')):.4f} epoch {e:.2f}" for k, e in epochs.items())
        self.log.console(f"step {step}/{self.max_steps} loss {shown} lr {m['lr']:.2e} gnorm {m['grad_norm'] or 0:.3f} "
                         f"{tps:,.0f} tok/s{mfu}{mem}{ep}")
        for t in (self.loss, self.n, self.src_nll, self.src_n):
            t.zero_()
        self.work = [0.0, 0.0, 0.0]
        self.throughput.reset()


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


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows a run logged (`metrics.jsonl`), in order; a row cut by a kill at the end is left out."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_losses(run_dir: str | Path, path: str | Path, reference: float | None = None, wall_s: float | None = None) -> None:
    """Training and validation loss (nats) against the step, from the run's metrics.jsonl, into `path` (PNG);
    `reference` draws a horizontal line (e.g. the unigram entropy of the training tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for split, style in (("train", "-"), ("val", "o-")):
        pts = [(r["step"], r["loss"]) for r in rows if r.get("split") == split and r.get("loss") is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=f"{split} loss")
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", label=f"unigram entropy {reference:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("Loss" + (f" ({wall_s / 60:.1f} min of training)" if wall_s else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
