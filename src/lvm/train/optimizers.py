"""The optimizer of a run, and how it is handed to DeepSpeed.

| name      | implementation                                          | state kept per parameter        |
| --------- | ------------------------------------------------------- | ------------------------------- |
| adamw     | DeepSpeed's: FusedAdam (GPU), DeepSpeedCPUAdam (ZeRO-Offload), torch AdamW on a CPU device | m, v in fp32: 8 B |
| lion      | DeepSpeed's: FusedLion (GPU), DeepSpeedCPULion (ZeRO-Offload, and on a CPU device, where FusedLion cannot run) | m in fp32: 4 B |
| sgd       | torch.optim.SGD with momentum, a client optimizer       | momentum buffer in fp32: 4 B    |
| adamw8bit | bitsandbytes.optim.AdamW8bit, a client optimizer        | m, v in uint8 (1 B each) + one fp32 absmax per block of 256 values each: 2 + 8/256 B; a tensor under 4096 values keeps 32-bit state (8 B) |

Under ZeRO the optimizer steps on the fp32 master partition DeepSpeed keeps (4 B per parameter, over the
data-parallel ranks), so these bytes come on top of it; `lvm.plan.model_states` does that arithmetic and
tests/train/test_optimizers.py checks it against the state tensors of real DeepSpeed engines.

AdamW and Lion are named in the ds_config's "optimizer" section (types "AdamW", "Lion") and built by
DeepSpeed. SGD and 8-bit AdamW are client optimizers, which DeepSpeed combines with ZeRO only with
`"zero_allow_untested_optimizer": true` (set here), and with ZeRO-Offload only when the ds_config says
`"zero_force_ds_cpu_optimizer": false` (DeepSpeed's own rule: offloaded states are stepped on the CPU,
where a torch optimizer is slow). `check` says in one line, before any compute, why an optimizer cannot
run; `make_optimizer` builds what `deepspeed.initialize(optimizer=..., config=...)` needs.
"""

from __future__ import annotations

import copy
import importlib.util

OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "lion")
# The ds_config "optimizer.type" of each choice ("Adam" is AdamW in DeepSpeed unless adam_w_mode is false).
DS_TYPES = {"adamw": "AdamW", "lion": "Lion", "sgd": "SGD", "adamw8bit": "AdamW8bit"}
_FROM_TYPE = {"adamw": "adamw", "adam": "adamw", "lion": "lion", "sgd": "sgd", "adamw8bit": "adamw8bit"}
# Hyper-parameters each optimizer takes besides lr and weight_decay, with the defaults used when the
# ds_config gives none (AdamW: LVM's betas; Lion: its paper's; SGD: the usual momentum).
EXTRA_PARAMS = {
    "adamw": {"betas": [0.9, 0.95], "eps": 1e-8},
    "adamw8bit": {"betas": [0.9, 0.95], "eps": 1e-8},
    "lion": {"betas": [0.9, 0.99]},
    "sgd": {"momentum": 0.9, "nesterov": False},
}
# bitsandbytes' 8-bit optimizers: blockwise quantization in blocks of 256 values, each with an fp32
# absmax; tensors with fewer than `min_8bit_size` values keep 32-bit states (bitsandbytes.optim.optimizer).
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
CLIENT = ("sgd", "adamw8bit")


class OptimizerError(ValueError):
    pass


def state_bytes_per_param(name: str, numel: int | None = None) -> float:
    """Bytes of optimizer state per parameter of a tensor of `numel` values (None: a large tensor)."""
    if name == "adamw":
        return 8.0
    if name in ("sgd", "lion"):
        return 4.0
    if name == "adamw8bit":
        if numel is not None and numel < BNB_MIN_8BIT_SIZE:
            return 8.0
        if numel is None:
            return 2.0 + 8.0 / BNB_BLOCK
        blocks = -(-numel // BNB_BLOCK)
        return 2.0 + 8.0 * blocks / numel
    raise OptimizerError(f"--optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def name_of_type(ds_type: str) -> str | None:
    """The --optimizer name of a ds_config optimizer.type (None for types this pipeline does not train with)."""
    return _FROM_TYPE.get(str(ds_type).lower())


def _zero(ds: dict) -> dict:
    z = ds.get("zero_optimization") or {}
    return z if isinstance(z, dict) else {}


def offloads_optimizer(ds: dict) -> bool:
    off = _zero(ds).get("offload_optimizer") or {}
    return isinstance(off, dict) and off.get("device", "none") not in ("none", None)


def check(name: str, ds: dict, device) -> None:
    """Raise OptimizerError (one line) when `name` cannot run with this ds_config on `device`; no compute."""
    if name not in OPTIMIZERS:
        raise OptimizerError(f"--optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    offload = offloads_optimizer(ds)
    if name in CLIENT and offload and ds.get("zero_force_ds_cpu_optimizer", True) is not False:
        raise OptimizerError(
            f"--optimizer {name}: ZeRO-Offload (zero_optimization.offload_optimizer) runs only DeepSpeed's CPU optimizers "
            f"(adamw, lion); set \"zero_force_ds_cpu_optimizer\": false in the ds_config to step {name} on the CPU anyway, "
            "or drop the offload")
    if name == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise OptimizerError("--optimizer adamw8bit needs bitsandbytes, which is not installed (pip install bitsandbytes)")
        _probe_bnb("cpu" if offload else str(device))
    op = cuda_op_needed(name, ds, device)
    if op is not None:
        why = cuda_op_unavailable(op)
        if why is not None:
            other = "adamw (torch's fused AdamW needs no build)" if name == "lion" else \
                "\"torch_adam\": true in the optimizer params (torch's fused AdamW)"
            raise OptimizerError(f"--optimizer {name} on a GPU runs DeepSpeed's {op} op, which is not prebuilt in this "
                                 f"DeepSpeed and cannot be compiled here ({why}): install DeepSpeed with "
                                 f"DS_BUILD_{op.upper()}=1, install the CUDA toolkit matching torch's CUDA, or use {other}")


# DeepSpeed CUDA ops an optimizer builds on a GPU when it is not prebuilt (deepspeed/ops/op_builder): a JIT
# compile with nvcc and ninja at deepspeed.initialize, after the model is built.
CUDA_OPS = {"adamw": "fused_adam", "lion": "fused_lion"}


def cuda_op_needed(name: str, ds: dict, device) -> str | None:
    """The DeepSpeed CUDA op `name` needs under this ds_config on `device` (None: none, or a host-side one)."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda" or offloads_optimizer(ds) or name not in CUDA_OPS:
        return None  # ZeRO-Offload steps on the CPU (DeepSpeedCPUAdam/CPULion: a C++ build, no nvcc)
    if name == "adamw" and (ds.get("optimizer") or {}).get("params", {}).get("torch_adam"):
        return None  # torch.optim.AdamW (lvm.train.ds_config picks its fused kernel when FusedAdam is not prebuilt)
    return CUDA_OPS[name]


def cuda_op_prebuilt(op: str) -> bool:
    """Whether this DeepSpeed install ships `op` built for CUDA (DS_BUILD_...=1), so nothing is compiled at start-up."""
    try:
        from deepspeed.git_version_info import accelerator_name, installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get(op)) and accelerator_name == "cuda"  # what DeepSpeed's OpBuilder.load asks


def cuda_op_unavailable(op: str) -> str | None:
    """Why DeepSpeed cannot load CUDA op `op` here (not prebuilt, and no nvcc/ninja to JIT-compile it), or None."""
    if cuda_op_prebuilt(op):
        return None
    import shutil

    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        return "ninja is not installed"
    try:  # DeepSpeed's own check before a JIT build: nvcc found, and its CUDA matches torch's
        from deepspeed.ops.op_builder.builder import assert_no_cuda_mismatch

        assert_no_cuda_mismatch(op)
    except Exception as e:  # MissingCUDAException, CUDAMismatchException
        return (str(e).strip().splitlines() or [type(e).__name__])[-1].strip(" >-")
    return None


def _probe_bnb(device: str) -> None:
    """bitsandbytes supports some devices only (CUDA; CPU from its multi-backend releases): try one tiny step."""
    import torch

    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.zeros(BNB_MIN_8BIT_SIZE, device=device))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW8bit([p], lr=1e-3).step()
    except Exception as e:  # any failure means: it cannot run here
        version = getattr(locals().get("bnb"), "__version__", "?")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OptimizerError(f"--optimizer adamw8bit: bitsandbytes {version} cannot run 8-bit AdamW on {device} "
                             f"({type(e).__name__}: {first}); choose adamw, sgd or lion") from None


def make_optimizer(name: str, param_groups, ds: dict, device) -> tuple[object | None, dict]:
    """(client optimizer or None, ds_config to hand to deepspeed.initialize) for a resolved ds_config.

    `ds` is the output of `lvm.train.ds_config.resolve` (its "optimizer" section holds lr, weight decay
    and the optimizer's hyper-parameters). For AdamW, and Lion on a GPU or under ZeRO-Offload, DeepSpeed
    builds the optimizer from that section and the client optimizer is None.
    """
    import torch

    check(name, ds, device)
    ds = copy.deepcopy(ds)
    device = torch.device(device)
    if name == "adamw" or (name == "lion" and (device.type != "cpu" or offloads_optimizer(ds))):
        ds.setdefault("optimizer", {})["type"] = DS_TYPES[name]
        return None, ds
    section = ds.pop("optimizer", {}) or {}
    params = {**EXTRA_PARAMS[name], **section.get("params", {})}
    lr, wd = float(params.get("lr", 1e-3)), float(params.get("weight_decay", 0.0))
    if name == "lion":  # CPU device: FusedLion is GPU-only; DeepSpeed's vectorized CPU Lion
        from deepspeed.ops.lion import DeepSpeedCPULion

        return DeepSpeedCPULion(param_groups, lr=lr, betas=tuple(params["betas"]), weight_decay=wd), ds
    if name == "sgd":
        opt = torch.optim.SGD(param_groups, lr=lr, momentum=float(params["momentum"]), weight_decay=wd,
                              nesterov=bool(params["nesterov"]))
    else:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(param_groups, lr=lr, betas=tuple(params["betas"]), eps=float(params["eps"]), weight_decay=wd)
    if int(_zero(ds).get("stage", 0) or 0) > 0:
        ds["zero_allow_untested_optimizer"] = True  # DeepSpeed's list of ZeRO-tested optimizers has neither
    return opt, ds
