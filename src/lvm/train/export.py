"""DeepSpeed checkpoint (ZeRO-2 or ZeRO-3) -> Hugging Face folder loadable by from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lvm.train import checkpoint as ckpt


def find_checkpoint(path: str | Path) -> tuple[Path, Path, str]:
    """(run folder, checkpoints folder, tag) from a run folder, a checkpoints folder or a tag folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint {p} does not exist")
    ckpt_dir, tag = ckpt.resolve_resume(str(p), p / "checkpoints" if (p / "checkpoints").is_dir() else p)
    run_dir = ckpt_dir.parent
    if not (run_dir / "model_config.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no model_config.json: not a run folder of launch/pretrain.py")
    return run_dir, ckpt_dir, tag


def load_fp32_model(path: str | Path):
    """A LlamaForCausalLM with the checkpoint's consolidated fp32 weights (CPU)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    run_dir, ckpt_dir, tag = find_checkpoint(path)
    cfg = LlamaConfig.from_json_file(str(run_dir / "model_config.json"))
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
    return model.float().eval(), run_dir, tag


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    model, run_dir, tag = load_fp32_model(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(str(out), safe_serialization=True)
    model.generation_config.bos_token_id = model.config.bos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.save_pretrained(str(out))
    if (run_dir / "tokenizer.json").is_file():  # what made the tokens travels with the model
        (out / "lvm_tokenizer.json").write_text((run_dir / "tokenizer.json").read_text())
    (out / "lvm_export.json").write_text(json.dumps({"run": str(run_dir), "tag": tag}, indent=2))
    return out
