"""Load a trained model for evaluation or generation: from a run folder, a DeepSpeed checkpoint
(ZeRO-2 or ZeRO-3, consolidated on the fly) or an exported Hugging Face folder.

On a GPU the weights are cast to bf16 (fp16 where bf16 is missing) and the buffers (RoPE's inverse
frequencies) stay fp32, as DeepSpeed kept them in training; the attention implementation is chosen by
`lvm.model.attention.resolve_attention`. Under several processes only rank 0 reads and consolidates the
checkpoint (the full fp32 model once per job, not once per rank: 8 copies on an 8-GPU node's host); the
other ranks build an empty model on their device and receive the weights by broadcast.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lvm.artifacts import locate


class ModelLoadError(ValueError):
    pass




def compute_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16






def _cast_parameters(model, device: torch.device, dtype: torch.dtype) -> None:
    """Move to `device`, parameters in `dtype` one at a time (the host never holds a second copy); buffers
    keep their dtype (RoPE's inverse frequencies stay fp32, as in training)."""
    for p in model.parameters():
        p.data = p.data.to(device, dtype)
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)
    # what the weights now are: transformers checks it when flash_attention_2 is set (a float32 config warns that
    # flash-attention cannot run, though every weight is bf16)
    model.config.dtype = dtype


def _load_whole(p: Path):
    """(model on the host in fp32, tokenizer info or None)."""
    from transformers import LlamaForCausalLM

    from lvm.train.export import load_fp32_model

    found = locate(p)
    if found.hf_dir is not None:
        model = LlamaForCausalLM.from_pretrained(str(found.hf_dir), dtype=torch.float32)
    else:
        try:
            model = load_fp32_model(found)
        except (FileNotFoundError, ValueError) as e:
            raise ModelLoadError(f"--checkpoint {p}: no model there ({e})") from None
    return model, found.tokenizer_info()


def load_model(path: str | Path, device: torch.device | None = None, attention: str = "auto"):
    """(LlamaForCausalLM in eval mode on `device`, tokenizer info dict or None).

    Under an initialised process group of several ranks every rank must call it: rank 0 loads, the others
    receive (`lvm.eval.model_io` docstring). A load error on rank 0 is raised on every rank."""
    import torch.distributed as dist

    from lvm.model.attention import resolve_attention

    p = Path(path)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(device)
    impl = resolve_attention(attention, device, dtype)[0]
    shared = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not shared:
        if not p.exists():
            raise ModelLoadError(f"--checkpoint {p} does not exist")
        model, info = _load_whole(p)
        _cast_parameters(model, device, dtype)
        model.set_attn_implementation(impl)
        return model.eval(), info

    from transformers import LlamaConfig, LlamaForCausalLM

    rank = dist.get_rank()
    model = info = None
    head: list = [None]
    if rank == 0:
        try:
            if not p.exists():
                raise ModelLoadError(f"--checkpoint {p} does not exist")
            model, info = _load_whole(p)
            head = [{"config": model.config.to_dict(), "info": info}]
        except (ModelLoadError, FileNotFoundError, ValueError) as e:
            head = [{"error": str(e)}]
    dist.broadcast_object_list(head, src=0, device=device if device.type == "cuda" else None)
    if "error" in head[0]:
        raise ModelLoadError(head[0]["error"])
    if rank == 0:
        _cast_parameters(model, device, dtype)
    else:
        info = head[0]["info"]
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig.from_dict(head[0]["config"]))
        for prm in model.parameters():
            prm.data = prm.data.to(dtype)
        model = model.to_empty(device=device)
        model.config.dtype = dtype
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=0)
    model.set_attn_implementation(impl)
    return model.eval(), info

