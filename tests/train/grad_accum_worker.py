"""One process: real DeepSpeed engines (CPU, bf16) built from ds_configs/zero2.json resolved for --precision bf16
at ZeRO stages 1-3 (argv) and one with the JSON's own choice; prints what each accumulates gradients in."""

import json
import sys

import deepspeed
import torch

from lvm.model.presets import llama_config
from lvm.train.ds_config import resolve
from lvm.train.engine import build_model, param_groups
from lvm.train.options import RunOptions


def accum_dtype(engine) -> str:
    opt = engine.optimizer
    if hasattr(opt, "gradient_accumulation_dtype"):  # ZeRO-2 and ZeRO-3 optimizers
        return str(opt.gradient_accumulation_dtype)
    # ZeRO-1 with bf16 weights and fp32 accumulation: DeepSpeed's BF16_Optimizer, fp32 gradient buffers
    return str(opt.fp32_groups_gradients_flat[0].dtype) if hasattr(opt, "fp32_groups_gradients_flat") else type(opt).__name__


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    base = json.loads(open("ds_configs/zero2.json").read())
    cases = [(int(s), None) for s in sys.argv[1:]] + [(2, "bf16")]
    for stage, json_choice in cases:
        raw = json.loads(json.dumps(base))
        raw["zero_optimization"]["stage"] = stage
        if json_choice:
            raw["data_types"] = {"grad_accum_dtype": json_choice}
        opts = RunOptions(micro_batch=1, grad_accum=2, precision="bf16", seq_len=64)
        ds = resolve(raw, opts, {"micro_batch", "grad_accum", "precision"}, 1, torch.device("cpu"))
        torch.manual_seed(0)
        model, keep = build_model(llama_config("tiny", 64), ds, False)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds)
        ids = torch.randint(0, 8192, (1, 64))
        for _ in range(2):  # one optimizer step of two micro-steps
            engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
            engine.step()
        print("RESULT " + json.dumps({"stage": stage, "json": json_choice, "config": ds["data_types"]["grad_accum_dtype"],
                                      "weights": str(next(engine.module.parameters()).dtype), "accum": accum_dtype(engine)}),
              flush=True)
        del engine, model, keep


if __name__ == "__main__":
    main()
