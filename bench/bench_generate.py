#!/usr/bin/env python
"""Generation speed: tokens/s sampling one image (256 tokens) after a 3-image prompt, with the KV
cache and without it (the whole prefix recomputed every token)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from lvm.eval.generate import Sampling, sample_codes  # noqa: E402
from lvm.model.presets import llama_config  # noqa: E402


def main() -> int:
    from transformers import LlamaForCausalLM

    rows = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for preset in (["tiny", "100m"] if device == "cpu" else ["300m", "1b"]):
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(llama_config(preset, 4096), attn_implementation="sdpa").to(device).eval()
        if device == "cuda":
            model = model.to(torch.bfloat16)
        prompt = torch.randint(0, 8192, (3, 256))
        for cache in (True, False):
            sample_codes(model, prompt[:1], Sampling(n_images=1, temperature=0, use_cache=cache))  # warm-up
            t = time.perf_counter()
            sample_codes(model, prompt, Sampling(n_images=1, temperature=1.0, use_cache=cache))
            dt = time.perf_counter() - t
            rows.append([preset, device, "KV cache" if cache else "no cache", f"{256 / dt:,.1f}"])
    print_table("Generation: one 256-token image after a 3-image prompt", ["model", "device", "mode", "tokens/s"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
