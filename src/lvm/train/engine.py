"""The model and its DeepSpeed engine: built on this rank's device, initialised (or filled from --init-from),
with the kernels, attention and optimizer the run asked for."""

from __future__ import annotations

import torch

from lvm.model.attention import resolve_attention
from lvm.model.kernels import apply_kernels, compile_layers
from lvm.train import init_from, optimizers
from lvm.train.ds_config import zero_stage


def no_decay(name: str) -> bool:
    return "norm" in name or name.endswith(".bias")


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for n, p in model.named_parameters():
        (plain if no_decay(n) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_model(cfg, ds: dict, grad_ckpt: bool, attention: str = "sdpa", device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, init: bool = True):
    """LlamaForCausalLM with `attention` (an implementation `lvm.model.attention.resolve_attention` chose).

    Under ZeRO-3 it is created inside deepspeed.zero.Init (never whole on one rank). Otherwise it is built on
    the meta device and materialised once, on `device` with its parameters in `dtype` (buffers such as RoPE's
    inv_freq stay fp32, as DeepSpeed keeps them): no fp32 host copy of the whole model, no init on the host.
    The weights are then drawn by the model's own init (`init`; normal(0, initializer_range), norms 1) with
    the current RNG, or left unset for `--init-from` to fill; the buffers are always computed from `cfg`."""
    from transformers import LlamaForCausalLM

    keepalive = None
    if zero_stage(ds) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds)  # makes transformers build and init the model under zero.Init
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=attention)
    else:
        model = materialise(cfg, attention, device, dtype, init)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, keepalive


def materialise(cfg, attention: str, device: torch.device | str, dtype: torch.dtype, init: bool):
    """The model built on the meta device, then allocated once on `device` (see `build_model`)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=attention)
    for p in model.parameters():
        p.data = p.data.to(dtype)  # still meta: no memory
    model.to_empty(device=device)  # uninitialised memory, buffers included
    with torch.no_grad():
        if init:
            model.initialize_weights()  # every module's _init_weights, RoPE's buffers among them
        else:
            for m in model.modules():
                if "RotaryEmbedding" in type(m).__name__:
                    model._init_weights(m)  # inv_freq / original_inv_freq from the config
    model.tie_weights()
    return model


def precision_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def build_engine(opts, cfg, ds: dict, device, rank: int, fresh: bool, multi_source: bool, log):
    """(engine, optimizer, attention implementation, keepalive). `fresh`: no checkpoint to resume, so --init-from
    fills the weights. Each choice is one console line."""
    import deepspeed

    torch.manual_seed(opts.seed)
    dtype = precision_dtype(opts.precision)
    attn, note = resolve_attention(opts.attention, device, dtype)
    if note:
        log.console(note)
    # on this rank's device in the compute dtype; --init-from fills the weights instead of a random init
    load_from = opts.init_from if fresh else None
    model, keepalive = build_model(cfg, ds, opts.grad_ckpt, attn, device=device, dtype=dtype, init=load_from is None)
    packed = opts.packing == "sentence"
    log.console(f"attention: {attn}" + (" (packed sentences: varlen, cu_seqlens from the packing)" if attn == "flash_attention_2"
                                        and packed else " (packed sentences: block-diagonal causal mask)" if packed else ""))
    log.console(apply_kernels(model, opts.kernels, device, need_logits=multi_source))
    if opts.compile:
        log.console(compile_layers(model, zero_stage(ds), report=log.console))  # and one line at the first forward
    if load_from:
        n = init_from.load_weights(model, load_from, rank)
        log.console(f"initialised from {load_from} ({n} tensors); optimizer and schedule start fresh")
    groups = param_groups(model, opts.weight_decay)
    client_opt, ds = optimizers.make_optimizer(opts.optimizer, groups, ds, device)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=client_opt, model_parameters=groups, config=ds)
    return engine, optimizer, attn, keepalive
