"""Visual prompting: prompt images -> tokens -> sampled continuation images -> pixels.

The prompt is `[BOS] img1 img2 ...` (no EOS, so the sentence goes on). Each new image is 256 sampled
tokens; only visual codes can be sampled (BOS/EOS/PAD and the padding rows get -inf). Sampling uses
the KV cache unless told not to; temperature 0 is greedy. Prompts longer than the window are cut
from the left by whole images (`prompt_room`: BOS + prompt + new images may be one token longer than
the window, since the last sampled token is never fed back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lvm.model.vocab import CODEBOOK_SIZE, TOKENS_PER_IMAGE, frame


class PromptError(ValueError):
    pass


@dataclass
class Sampling:
    n_images: int = 1
    temperature: float = 1.0
    top_k: int | None = 100
    top_p: float | None = None
    seed: int = 0
    num_samples: int = 1
    use_cache: bool = True


def visual_only_processor():
    from transformers import LogitsProcessor

    class VisualOnly(LogitsProcessor):
        """Any id outside 0..8191 (BOS, EOS, PAD, embedding padding rows) can never be sampled."""

        def __call__(self, input_ids, scores):
            scores[:, CODEBOOK_SIZE:] = -float("inf")
            return scores

    return VisualOnly()


def prompt_room(window: int, n_new: int) -> int:
    """How many whole prompt images fit the window next to BOS and `n_new` new images (>= 1, else PromptError).

    A window of W positions takes W inputs and predicts the token after each, so BOS, the prompt and the
    new images may total W + 1 tokens: the last sampled token is never an input. With W = 4096 and one new
    image that is 15 prompt images, the paper's longest context (`lvm.eval.perplexity` scores the same way)."""
    images = (window - n_new * TOKENS_PER_IMAGE) // TOKENS_PER_IMAGE
    if images < 1:
        raise PromptError(f"{n_new} new images ({n_new * TOKENS_PER_IMAGE} tokens) leave no room for a prompt image "
                          f"in the model's window of {window} tokens")
    return images


def fit_prompt(prompt_codes: torch.Tensor, window: int, n_new: int) -> tuple[torch.Tensor, int]:
    """Keep the last whole images that fit with BOS and the new images; (codes [k, 256], dropped count)."""
    keep = min(len(prompt_codes), prompt_room(window, n_new))
    return prompt_codes[len(prompt_codes) - keep :], len(prompt_codes) - keep


@torch.no_grad()
def sample_codes(model, prompt_codes: torch.Tensor, s: Sampling) -> torch.Tensor:
    """prompt codes [k, 256] -> generated codes [num_samples, n_images, 256]."""
    return sample_batch(model, prompt_codes[None], s)[0]


@torch.no_grad()
def sample_batch(model, prompts: torch.Tensor, s: Sampling) -> torch.Tensor:
    """prompts [B, k, 256] (k prompt images each) -> generated codes [B, num_samples, n_images, 256], in one
    `generate` call (its rows are grouped by prompt). The seed is set once per call, so a prompt's samples
    depend on the prompts batched with it."""
    device = next(model.parameters()).device
    flat = prompts.reshape(len(prompts), -1).long().numpy()
    # [BOS] codes: a sentence that goes on
    ids = torch.from_numpy(np.stack([frame(c, end=len(c) + 1) for c in flat])).to(device)
    n_new = s.n_images * TOKENS_PER_IMAGE
    greedy = s.temperature <= 0
    torch.manual_seed(s.seed)
    kwargs = {"do_sample": not greedy, "max_new_tokens": n_new, "min_new_tokens": n_new,
              "use_cache": s.use_cache, "num_return_sequences": s.num_samples,
              "logits_processor": [visual_only_processor()], "pad_token_id": model.config.pad_token_id,
              "eos_token_id": None, "attention_mask": torch.ones_like(ids)}
    if not greedy:
        kwargs.update(temperature=s.temperature, top_k=s.top_k or 0, top_p=s.top_p if s.top_p else 1.0)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    out = model.generate(ids, **kwargs)
    new = out[:, ids.shape[1] :].cpu()
    return new.view(len(prompts), s.num_samples, s.n_images, TOKENS_PER_IMAGE)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images (or batches) in [0, 1]."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def generation_report(generated: torch.Tensor, truth_tokenized: torch.Tensor, truth: torch.Tensor) -> dict:
    """PSNR of generated images [S, n, 3, H, W] against the true next images [n, 3, H, W], as the tokenizer
    reproduces them (encode + decode) and as they are; means over the samples and per sample."""
    per_tok = [psnr(g, truth_tokenized) for g in generated]
    per_px = [psnr(g, truth) for g in generated]
    return {"psnr_tokenized_truth": sum(per_tok) / len(per_tok), "psnr_truth": sum(per_px) / len(per_px),
            "psnr_tokenized_truth_per_sample": per_tok, "psnr_truth_per_sample": per_px,
            "psnr_tokenizer": psnr(truth_tokenized, truth)}


def save_outputs(prompt: torch.Tensor, generated: torch.Tensor, out_dir, truth: torch.Tensor | None = None) -> list:
    """PNG per generated image and grid.png (a row per sample: prompt images | generated images [| truth])."""
    from pathlib import Path

    from PIL import Image

    from lvm.tokenizer.preprocess import to_uint8

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompt_px, gen_px = to_uint8(prompt), to_uint8(generated)  # [k,H,W,3], [S,n,H,W,3]
    truth_px = to_uint8(truth) if truth is not None else np.zeros((0,) + gen_px.shape[2:], np.uint8)
    paths = []
    for si in range(gen_px.shape[0]):
        for j in range(gen_px.shape[1]):
            name = f"generated_{si * gen_px.shape[1] + j}.png"
            Image.fromarray(gen_px[si, j]).save(out_dir / name)
            paths.append(out_dir / name)
    gap = 8
    size = gen_px.shape[2]
    bars = 1 + (len(truth_px) > 0)
    cols = len(prompt_px) + gen_px.shape[1] + len(truth_px)
    grid = np.full((gen_px.shape[0] * (size + gap) - gap, cols * size + (cols - 1) * gap + 3 * gap * bars, 3), 255,
                   np.uint8)
    for si in range(gen_px.shape[0]):
        y = si * (size + gap)
        row = list(prompt_px) + [None] + list(gen_px[si]) + ([None] + list(truth_px) if len(truth_px) else [])
        x = 0
        for img in row:
            if img is None:  # a wider gap and a bar between prompt and generation
                grid[y : y + size, x + gap : x + 2 * gap] = (200, 30, 30)
                x += 3 * gap
                continue
            grid[y : y + size, x : x + size] = img
            x += size + gap
    Image.fromarray(grid).save(out_dir / "grid.png")
    return paths
