"""Load a trained model for evaluation or generation: from a run folder, a DeepSpeed checkpoint
(ZeRO-2 or ZeRO-3, consolidated on the fly) or an exported Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class ModelLoadError(ValueError):
    pass


def is_hf_folder(p: Path) -> bool:
    has_weights = any(p.glob("*.safetensors")) or (p / "pytorch_model.bin").is_file()
    return (p / "config.json").is_file() and has_weights


def model_window(path: str | Path) -> int:
    """The model's context window from its config alone (no weights are read)."""
    p = Path(path)
    for cand in (p / "config.json", p / "model_config.json", p.parent / "model_config.json", p.parent.parent / "model_config.json",
                 p.parent.parent.parent / "model_config.json"):
        if cand.is_file():
            return int(json.loads(cand.read_text())["max_position_embeddings"])
    raise ModelLoadError(f"--checkpoint {p}: no model there (no config.json or model_config.json)")


def load_model(path: str | Path, device: torch.device | None = None):
    """(LlamaForCausalLM in eval mode, tokenizer info dict or None)."""
    from transformers import LlamaForCausalLM

    from lvm.train.checkpoint import CheckpointError
    from lvm.train.export import load_fp32_model

    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"--checkpoint {p} does not exist")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if is_hf_folder(p):
        model = LlamaForCausalLM.from_pretrained(str(p))
        info_file = p / "lvm_tokenizer.json"
    else:
        try:
            model, run_dir, _ = load_fp32_model(p)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            raise ModelLoadError(f"--checkpoint {p}: no model there ({e})") from None
        info_file = run_dir / "tokenizer.json"
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = model.to(device, dtype).eval()
    info = json.loads(info_file.read_text()) if info_file.is_file() else None
    return model, info


def run_folder(path: str | Path) -> Path | None:
    """The training run folder behind a checkpoint path, if there is one (for TensorBoard)."""
    p = Path(path).resolve()
    for cand in (p, p.parent, p.parent.parent):
        if (cand / "model_config.json").is_file() and (cand / "tensorboard").is_dir():
            return cand
    return None
