"""Resolve a DeepSpeed JSON against the run's options: "auto" is filled, contradictions are errors.

The CLI owns micro batch, accumulation, learning rate, weight decay, clipping, precision and the
optimizer. A JSON value of "auto" takes the flag's value; a concrete JSON value is adopted unless the
user also set the flag to something else, which stops the run with a message saying what to change.
The optimizer is the "optimizer" section's type (AdamW, Lion, SGD, AdamW8bit; "auto" or no section: the
flag, default adamw); `lvm.train.optimizers` says why one cannot run, before any compute.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from lvm.train import optimizers
from lvm.train.options import RunOptions

# (path in the ds_config, RunOptions field, flag)
OWNED = [
    (("train_micro_batch_size_per_gpu",), "micro_batch", "--micro-batch"),
    (("gradient_accumulation_steps",), "grad_accum", "--grad-accum"),
    (("gradient_clipping",), "grad_clip", "--grad-clip"),
    (("optimizer", "params", "lr"), "lr", "--lr"),
    (("optimizer", "params", "weight_decay"), "weight_decay", "--weight-decay"),
]


class ConfigError(ValueError):
    pass


def _get(d: dict, path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _set(d: dict, path, value) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path} is not valid JSON: {e}") from None


def pick_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("--precision bf16: this GPU has no bf16 support; use fp16 or fp32")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def resolve(ds: dict, opts: RunOptions, given: set[str], world_size: int, device: torch.device) -> dict:
    """A concrete DeepSpeed config for this run; updates `opts` with values adopted from the JSON."""
    ds = copy.deepcopy(ds)
    planned = ds.pop("lvm_plan", {})  # written by launch/plan.py: choices DeepSpeed has no key for
    if planned.get("activation_checkpointing") and "grad_ckpt" not in given:
        opts.grad_ckpt = True
    choose_optimizer(ds, opts, given)

    def settle(path, field, flag):
        cur = _get(ds, path)
        mine = getattr(opts, field)
        if cur is None or cur == "auto":
            _set(ds, path, mine)
        elif field in given and cur != mine:
            raise ConfigError(f"ds_config sets {'.'.join(path)}={cur} but {flag} {mine}: set it to \"auto\" in the "
                              "JSON to let the flag decide, or drop the flag")
        else:
            setattr(opts, field, type(mine)(cur))

    settle(*OWNED[0])  # the micro batch first: the global batch arithmetic needs it
    if "global_batch_tokens" in given:
        per_step = opts.micro_batch * world_size * opts.seq_len
        if opts.global_batch_tokens % per_step:
            raise ConfigError(f"--global-batch-tokens {opts.global_batch_tokens} is not a multiple of micro batch x "
                              f"world size x seq len = {opts.micro_batch} x {world_size} x {opts.seq_len} = {per_step}")
        opts.grad_accum = opts.global_batch_tokens // per_step
        given = given | {"grad_accum"}
    for entry in OWNED[1:]:
        settle(*entry)
    tb = ds.get("train_batch_size", "auto")
    want = opts.micro_batch * opts.grad_accum * world_size
    if tb not in ("auto", None) and int(tb) != want:
        raise ConfigError(f"ds_config train_batch_size={tb} but micro batch {opts.micro_batch} x accumulation "
                          f"{opts.grad_accum} x world size {world_size} = {want}")
    ds["train_batch_size"] = want
    precision = pick_precision(opts.precision, device)
    for key in ("bf16", "fp16"):
        block = ds.setdefault(key, {})
        enabled = block.get("enabled", "auto")
        if enabled == "auto":
            block["enabled"] = precision == key
        elif bool(enabled) != (precision == key) and "precision" in given:
            raise ConfigError(f"ds_config {key}.enabled={enabled} contradicts --precision {precision}")
        elif bool(enabled):
            precision = key
    if ds["bf16"]["enabled"] and ds["fp16"]["enabled"]:
        raise ConfigError("ds_config enables both bf16 and fp16")
    opts.precision = precision
    if device.type != "cuda" and ds["optimizer"]["type"] == "AdamW":
        ds["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)  # no fused CUDA Adam on CPU
    stage = int(_get(ds, ("zero_optimization", "stage")) or 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ds_config zero_optimization.stage={stage}: must be 0-3")
    if precision == "bf16" and stage >= 1:
        # DeepSpeed accumulates gradients in the model's dtype unless told otherwise: over micro-steps (and
        # ranks) bf16 sums lose the small contributions. fp32 accumulation unless the JSON chose a dtype.
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    if device.type == "cuda" and ds["optimizer"]["type"] == "AdamW" and not fused_adam_prebuilt():
        # DeepSpeed's FusedAdam would be compiled at start-up (nvcc and ninja needed, a minute or more, or a
        # failure on a machine without the CUDA toolkit); torch's fused AdamW is the same update, prebuilt.
        params = ds["optimizer"].setdefault("params", {})
        if "torch_adam" not in params and not optimizers.offloads_optimizer(ds):
            params.update(torch_adam=True, fused=True)
    try:
        optimizers.check(opts.optimizer, ds, device)
    except optimizers.OptimizerError as e:
        raise ConfigError(str(e)) from None
    ds.setdefault("steps_per_print", 10**9)  # our own logger reports progress
    leftover = [".".join(p) for p in _auto_paths(ds)]
    if leftover:
        raise ConfigError(f"ds_config leaves {', '.join(leftover)} as \"auto\" and no flag fills them "
                          "(use launch/plan.py or --gpu-mem-gib to plan them, or set values)")
    return ds


def fused_adam_prebuilt() -> bool:
    """Whether this DeepSpeed install ships its FusedAdam op built (DS_BUILD_FUSED_ADAM=1), not JIT-compiled."""
    return optimizers.cuda_op_prebuilt("fused_adam")


def optimizer_name(ds: dict, opts, given: set[str], allow_auto: bool = False) -> str:
    """The optimizer of the run: --optimizer, or the ds_config's optimizer.type; a contradiction is an error.
    "auto" (the planner's choice) only where the planner runs (`allow_auto`)."""
    flag = getattr(opts, "optimizer", "adamw")  # RunOptions.optimizer (default adamw)
    if flag not in optimizers.OPTIMIZERS and not (allow_auto and flag == "auto"):
        raise ConfigError(f"--optimizer {flag}: choose one of {', '.join(optimizers.OPTIMIZERS)}"
                          + (" (auto needs --gpu-mem-gib, whose plan chooses it)" if flag == "auto" else ""))
    section = ds.get("optimizer")
    typ = section.get("type", "auto") if isinstance(section, dict) else "auto"
    if typ in ("auto", None):
        return flag
    name = optimizers.name_of_type(typ)
    if name is None:
        raise ConfigError(f"ds_config optimizer.type={typ}: this pipeline trains with "
                          f"{', '.join(optimizers.DS_TYPES.values())} (--optimizer {', '.join(optimizers.OPTIMIZERS)})")
    if "optimizer" in given and name != flag:
        raise ConfigError(f"ds_config sets optimizer.type={typ} but --optimizer {flag}: set it to \"auto\" in the JSON "
                          "to let the flag decide, or drop the flag")
    return name


def choose_optimizer(ds: dict, opts, given: set[str]) -> None:
    """Settle the optimizer (on `opts.optimizer`) and write its section: type, lr/weight decay "auto", and the
    hyper-parameters it takes (those the JSON gives win; ones it cannot take are dropped when the JSON
    left the type to the flag)."""
    name = optimizer_name(ds, opts, given)
    section = ds.get("optimizer") if isinstance(ds.get("optimizer"), dict) else {}
    params = dict(section.get("params") or {})
    if section.get("type", "auto") in ("auto", None):
        # DeepSpeed's own switches of its AdamW implementation stay with AdamW
        impl = {"torch_adam", "fused", "adam_w_mode"} if name == "adamw" else set()
        keep = {"lr", "weight_decay", *optimizers.EXTRA_PARAMS[name], *impl}
        params = {k: v for k, v in params.items() if k in keep}
    params = {**optimizers.EXTRA_PARAMS[name], **params}
    params.setdefault("lr", "auto")
    params.setdefault("weight_decay", "auto")
    ds["optimizer"] = {**section, "type": optimizers.DS_TYPES[name], "params": params}
    opts.optimizer = name


def _auto_paths(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _auto_paths(v, prefix + (k,))
    elif d == "auto":
        yield prefix


def zero_stage(ds: dict) -> int:
    return int(_get(ds, ("zero_optimization", "stage")) or 0)
