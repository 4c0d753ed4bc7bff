"""Run under torch.distributed.run: real DeepSpeed steps per case; print what this rank holds.

argv[1]: JSON list of cases {"optimizer", "stage", "precision", "extra": ds_config keys, "steps"}; argv[2]: a
folder where each rank writes rank<R>.jsonl, one line per case: the bytes of the optimizer state tensors and of the fp32 master partition
after the steps, the bytes of gradients held when the last optimizer step begins, and (ZeRO-3) the parameters gathered at the
forward/backward turn of the last step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def master_bytes(zero_opt) -> int:
    """The fp32 master partition DeepSpeed's ZeRO optimizer keeps (stage 1/2, stage 3 or BF16_Optimizer attribute names)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        if hasattr(zero_opt, attr):
            return tensor_bytes(list(getattr(zero_opt, attr)))
    raise AssertionError(f"no fp32 master partition on {type(zero_opt).__name__}")


def tensors_in(obj) -> list:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


def grad_bytes(zero_opt, model) -> int:
    """Gradient bytes this rank holds: the parameters' .grad and the optimizer's gradient buffers (BF16_Optimizer's
    fp32 buffer; the ZeRO-1/2 optimizer's accumulated partition and 16-bit partition), each storage counted once."""
    tensors = [p.grad for p in model.parameters() if p.grad is not None]
    for attr in ("fp32_groups_gradients_flat", "averaged_gradients", "grads_in_partition"):
        tensors += tensors_in(getattr(zero_opt, attr, None))
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def param_groups(model, weight_decay: float) -> list[dict]:
    """The trainer's two groups: weights with decay; norms and biases without (lvm.plan.model_states.no_decay_params)."""
    plain = [p for n, p in model.named_parameters() if "norm" in n or n.endswith(".bias")]
    decay = [p for n, p in model.named_parameters() if not ("norm" in n or n.endswith(".bias"))]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def run_case(case: dict, rank: int, world: int) -> dict:
    import deepspeed
    from transformers import LlamaForCausalLM

    from lvm.model.presets import llama_config
    from lvm.train.ds_config import resolve
    from lvm.train.optimizers import make_optimizer
    from lvm.train.options import RunOptions

    torch.manual_seed(0)
    opts = RunOptions(model="tiny", seq_len=64, micro_batch=2, lr=1e-3, precision=case["precision"])
    opts.optimizer = case["optimizer"]
    ds = {"optimizer": {"type": "auto"}, "zero_optimization": {"stage": case["stage"]},
          "gradient_clipping": 1.0, **case.get("extra", {})}
    ds = resolve(ds, opts, {"optimizer", "precision", "micro_batch"}, world, torch.device("cpu"))
    cfg = llama_config("tiny", 64)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    groups = param_groups(model, opts.weight_decay)
    client, ds = make_optimizer(opts.optimizer, groups, ds, torch.device("cpu"))
    engine, *_ = deepspeed.initialize(model=model, optimizer=client, model_parameters=groups, config=ds)
    live = None
    held = {}
    step = engine.optimizer.step

    def measured_step(*a, **k):  # what the backward left: the gradients the update reads
        held["grads"] = grad_bytes(engine.optimizer, model)
        return step(*a, **k)

    engine.optimizer.step = measured_step
    for _ in range(case.get("steps", 1)):
        ids = torch.randint(0, 8192, (2, 64))
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        if case["stage"] == 3:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            live = sum(p.ds_numel for p in model.parameters()
                       if p.ds_status in (ZeroParamStatus.AVAILABLE, ZeroParamStatus.INFLIGHT))
        engine.backward(loss)
        engine.step()
    zero_opt = engine.optimizer
    basic = engine.basic_optimizer
    state = tensor_bytes([st for st in basic.state.values()])
    return {**case, "rank": rank, "world": world, "basic": type(basic).__name__, "state_bytes": state,
            "master_bytes": master_bytes(zero_opt), "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                                                    for p in model.parameters()),
            "loss_finite": bool(torch.isfinite(loss).item()), "live_numel": live, "grad_bytes": held.get("grads"),
            "optimizer_class": type(zero_opt).__name__}


def main() -> int:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    lines = [json.dumps(run_case(case, rank, world)) for case in json.loads(sys.argv[1])]
    out = Path(sys.argv[2])
    (out / f".rank{rank}.tmp").write_text("\n".join(lines) + "\n")
    os.replace(out / f".rank{rank}.tmp", out / f"rank{rank}.jsonl")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)
