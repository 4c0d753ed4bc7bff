"""What "the model learned" means here, and the recipe that shows it.

One definition, used by `make demo` (src/lvm/demo.py, 2 CPU ranks), by `make gpu-check`'s learning step (the same
recipe with more tokens per step) and by the convergence test (tests/convergence):
- the final training loss (mean of the last tenth of the logged steps) is well below the unigram entropy of the
  training tokens, i.e. the model predicts more than token frequencies;
- held-out perplexity of a frame given k earlier frames of its clip is at most half of that given none, at the
  context lengths asked for, and the curve never rises (by more than 5%) as frames are added;
- a next frame generated from prompt frames is closer (PSNR) to the truth than one generated from nothing.

The recipe (docs/learning.md says why each choice): the `demo` preset (tied embeddings, one attention head of width
64, initialiser std 0.1), 1024-token windows (four 256-token frames), a high learning rate with a short warm-up and
a cosine decay to a tenth, one window per rank per step on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple


class Check(NamedTuple):
    ok: bool
    what: str


@dataclass(frozen=True)
class Recipe:
    """The training run of the learning proof, as `launch/pretrain.py` flags."""

    model: str = "demo"
    seq_len: int = 1024
    micro_batch: int = 1
    steps: int = 600
    warmup_steps: int = 30
    lr: float = 1e-2
    final_lr_ratio: float = 0.1
    log_every: int = 10
    evals: int = 4  # validation passes during training (their losses are on loss.png)
    eval_max_sentences: int = 64

    def pretrain_flags(self, data: str, output: str, seed: int = 0) -> list[str]:
        return ["--ds_config", "ds_configs/zero2.json", "--model", self.model, "--data", data, "--output", output,
                "--seq-len", str(self.seq_len), "--micro-batch", str(self.micro_batch), "--max-steps", str(self.steps),
                "--warmup-steps", str(self.warmup_steps), "--lr", str(self.lr), "--min-lr", str(self.lr * self.final_lr_ratio),
                "--log-every", str(self.log_every), "--eval-every", str(max(1, self.steps // max(1, self.evals))),
                "--eval-max-sentences", str(self.eval_max_sentences), "--save-every", str(self.steps), "--seed", str(seed)]

    def scaled(self, micro_batch: int, steps: int) -> Recipe:
        """The same recipe with more windows per step and more steps (a GPU): model, window, learning rate and
        schedule shape stay; warm-up and logging keep their share of the run."""
        return replace(self, micro_batch=micro_batch, steps=steps,
                       warmup_steps=max(1, round(self.warmup_steps * steps / self.steps)),
                       log_every=max(1, round(self.log_every * steps / self.steps)))


CPU_RECIPE = Recipe()
# one GPU: 8 windows per step and 1,500 steps (20x the CPU demo's tokens), on 4x the demo's videos
GPU_RECIPE = CPU_RECIPE.scaled(micro_batch=8, steps=1500)
PROMPT_FRAMES = 3


def final_loss(train_rows: list[dict]) -> tuple[float, int]:
    """Mean training loss of the last tenth of the logged steps (at least one), and how many steps that is."""
    if not train_rows:
        raise ValueError("no training loss was logged")
    last = train_rows[-max(1, len(train_rows) // 10):]
    return sum(r["loss"] for r in last) / len(last), len(last)


def learning_checks(final: float, unigram: float, curve: dict[int, float], *, min_gap: float = 2.0,
                    at: tuple[int, ...] = (PROMPT_FRAMES,), max_ratio: float = 0.5, max_rise: float = 1.05) -> list[Check]:
    """The loss and context-curve criteria: `curve` maps context frames -> held-out perplexity of the next frame."""
    checks = [Check(unigram - final >= min_gap,
                    f"final training loss {final:.2f} is >= {min_gap:g} nats below the unigram entropy {unigram:.2f}")]
    missing = [k for k in (0, *at) if k not in curve]
    if missing:
        have = sorted(curve)
        return [*checks, Check(False, f"the context curve has no value at {missing} frames (it has {have}): no held-out "
                                      f"clip is long enough inside the window")]
    for k in at:
        ratio = curve[k] / curve[0]
        checks.append(Check(ratio <= max_ratio, f"perplexity with {k} context frames is {ratio:.2f} x that with none "
                                                f"(<= {max_ratio:g})"))
    ks = sorted(curve)
    rises = [k for k, k1 in zip(ks, ks[1:], strict=False) if curve[k1] > max_rise * curve[k]]
    checks.append(Check(not rises, "the context curve never rises as frames are added"
                        + (f" (it rises after {rises} frames)" if rises else "")))
    return checks


def generation_check(psnr_prompted: float, psnr_unprompted: float, prompt_frames: int = PROMPT_FRAMES) -> Check:
    return Check(psnr_prompted > psnr_unprompted,
                 f"the frame generated from {prompt_frames} prompt frames is closer to the truth ({psnr_prompted:.2f} dB) "
                 f"than one generated without them ({psnr_unprompted:.2f} dB)")
