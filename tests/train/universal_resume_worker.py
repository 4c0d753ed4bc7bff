"""One process (gloo, CPU): a real universal-checkpoint resume with torch's AdamW; print where the optimizer
state ends up after `lvm.train.elastic.load`.

argv[1]: JSON list of cases {"stage", "fused"}; argv[2]: a scratch folder. Per case: an engine trains 2 steps and
saves a tag, the tag is converted to DeepSpeed's universal format (`elastic.convert_to_universal`), and a new engine
loads it with `load_universal` through `elastic.load` twice:
  - "real": as training does, then takes one more step;
  - "device": the same load, but before `elastic.load` places the state the optimizer's parameters are moved to
    the meta device, a stand-in for a GPU: DeepSpeed's universal loader hands `step` back as a CPU tensor
    whatever device the parameters are on.
Prints one JSON line per case.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build(stage: int, fused: bool, universal: bool):
    import deepspeed
    from transformers import LlamaForCausalLM

    from lvm.model.presets import llama_config
    from lvm.train.ds_config import resolve
    from lvm.train.engine import param_groups
    from lvm.train.optimizers import make_optimizer
    from lvm.train.options import RunOptions

    torch.manual_seed(0)
    opts = RunOptions(model="tiny", seq_len=64, micro_batch=2, lr=1e-3, precision="fp32")
    ds = {"optimizer": {"type": "auto", "params": {"torch_adam": True, "fused": fused}},
          "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0}
    ds = resolve(ds, opts, {"precision", "micro_batch"}, 1, torch.device("cpu"))
    if universal:
        ds["checkpoint"] = {"load_universal": True}
    model = LlamaForCausalLM._from_config(llama_config("tiny", 64), attn_implementation="sdpa")
    groups = param_groups(model, 0.1)
    client, ds = make_optimizer("adamw", groups, ds, torch.device("cpu"))
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=client, model_parameters=groups, config=ds)
    return engine, optimizer


def train_step(engine) -> float:
    ids = torch.randint(0, 8192, (2, 64))
    loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


def placement(optimizer) -> dict:
    from lvm.train.bad_steps import innermost_optimizer

    base = innermost_optimizer(optimizer)
    rows, steps = [], []
    for p, state in base.state.items():  # under ZeRO-3 the groups list their partition only while it steps
        group = next((g for g in base.param_groups if any(q is p for q in g["params"])), base.defaults)
        rows.append({"param": str(p.device), "fused": bool(group.get("fused")),
                     **{k: [str(v.device), str(v.dtype).removeprefix("torch.")] for k, v in state.items() if torch.is_tensor(v)}})
        if torch.is_tensor(state.get("step")):
            steps.append(id(state["step"]))
    return {"optimizer": type(base).__name__, "states": rows, "distinct_steps": len(set(steps)) == len(steps)}


def params_to_meta(engine, optimizer):
    """After DeepSpeed's own load (before elastic.load places the state): the optimizer's parameters on 'meta'."""
    from lvm.train.bad_steps import innermost_optimizer

    load = engine.load_checkpoint

    def load_then_move(*args, **kwargs):
        out = load(*args, **kwargs)
        base = innermost_optimizer(optimizer)
        meta = {p: torch.empty_like(p, device="meta") for p in base.state}
        for p, m in meta.items():
            base.state[m] = base.state.pop(p)
        for group in base.param_groups:
            group["params"] = [meta.get(p, p) for p in group["params"]]
        return out

    engine.load_checkpoint = load_then_move


def run_case(case: dict, scratch: Path) -> dict:
    from lvm.train import elastic

    stage, fused = case["stage"], case["fused"]
    ckpt_dir = scratch / f"z{stage}-{'fused' if fused else 'plain'}"
    engine, _ = build(stage, fused, universal=False)
    for _ in range(2):
        train_step(engine)
    engine.save_checkpoint(str(ckpt_dir), tag="step_00000002")
    name = elastic.convert_to_universal(ckpt_dir, "step_00000002")

    engine, optimizer = build(stage, fused, universal=True)
    elastic.load(engine, optimizer, (ckpt_dir, name))
    real = placement(optimizer)
    real["loss_after"] = train_step(engine)

    engine, optimizer = build(stage, fused, universal=True)
    params_to_meta(engine, optimizer)
    elastic.load(engine, optimizer, (ckpt_dir, name))
    return {**case, "real": real, "device": placement(optimizer)}


def main() -> int:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    for case in json.loads(sys.argv[1]):
        print("RESULT " + json.dumps(run_case(case, Path(sys.argv[2]))), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)
