"""DeepSpeed checkpoint (ZeRO-2 or ZeRO-3) -> Hugging Face folder loadable by from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lvm.artifacts import EXPORT_TOKENIZER, Artifact, locate


def load_fp32_model(found: str | Path | Artifact):
    """A LlamaForCausalLM with the consolidated fp32 weights (CPU) of the checkpoint a path names (`locate`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    found = found if isinstance(found, Artifact) else locate(found)
    ckpt_dir, tag = found.checkpoint()
    cfg = LlamaConfig.from_dict(found.config())
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt_dir / tag} does not match model_config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    # non-persistent buffers (RoPE inverse frequencies) are not in checkpoints: build them for real
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=cfg)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"checkpoint {ckpt_dir / tag} left tensors unset: {left[:5]}")
    return model.float().eval()


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """`checkpoint`: any path `lvm.artifacts.locate` knows that names a DeepSpeed checkpoint."""
    found = locate(checkpoint)
    model = load_fp32_model(found)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(str(out), safe_serialization=True)
    model.generation_config.bos_token_id = model.config.bos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.save_pretrained(str(out))
    if found.tokenizer_file:  # what made the tokens travels with the model
        (out / EXPORT_TOKENIZER).write_text(found.tokenizer_file.read_text())
    (out / "lvm_export.json").write_text(json.dumps({"run": str(found.run_dir), "tag": found.tag}, indent=2))
    return out
