"""Step 6: one asserted row per fix that only a GPU shows (RNG on resume, fused AdamW after a universal load,
--compile)."""

from __future__ import annotations

try:
    import numpy as np
except ImportError:  # reported by no_gpu_reason with the rest of what is missing
    np = None

from gpu_checks.procs import error_line
from gpu_checks.report import Report


def rng_resume_check(device) -> dict:
    """The generators after a resume draw what they drew when saved, on `device` (`lvm.train.checkpoint`):

    - `equal`: seed, `gather_rng_states()` (one process: `{"ranks": [rng_state()]}`), draw (on `device`, torch's
      CPU generator, Python's, NumPy's), `set_rng_state(saved, rank=0)`, draw again: the same numbers;
    - `control_differs`: a third draw without restoring differs (the comparison can tell);
    - `rank1_equal`: rank 1's entry of a 2-rank state restored by a process that sees one device (its device 0);
    - `old_format_equal`: a state of the older format (every device the saving process saw, by index, here one
      index more than this process has) restores this device's entry without touching the missing one;
    - `current_only`: on CUDA, `rng_state()` holds one tensor (the current device's), not a list."""
    import random

    import torch

    from lvm.train.checkpoint import gather_rng_states, rng_state, set_rng_state

    cuda = device.type == "cuda"

    def draw():
        return torch.rand(64, device=device).cpu(), torch.rand(4), random.random(), float(np.random.rand())

    def same(a, b):
        return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]

    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    saved = gather_rng_states()
    first = draw()
    set_rng_state(saved, rank=0)
    again = draw()
    third = draw()
    other = rng_state()  # rank 0's state in a 2-rank checkpoint
    draw()
    mine = rng_state()  # rank 1's: another point of the same streams
    drawn = draw()
    set_rng_state({"ranks": [other, mine]}, rank=1)
    rank1 = draw()
    old = rng_state()
    if cuda:
        here = torch.cuda.current_device()
        old["cuda"] = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())]
        old["cuda"].append(old["cuda"][here].clone())  # a device index this process does not have
    before = draw()
    set_rng_state(old, rank=0)
    after = draw()
    return {"equal": same(first, again), "control_differs": not torch.equal(third[0], first[0]),
            "rank1_equal": same(drawn, rank1), "old_format_equal": same(before, after),
            "current_only": (not cuda) or torch.is_tensor(saved["ranks"][0]["cuda"])}


def fused_adamw_resume_check(device) -> dict:
    """torch's fused AdamW steps after a universal-checkpoint load (`lvm.train.elastic.place_optimizer_state`):
    two copies of a small model on `device`, each with AdamW(fused=True), take a step; every state tensor of the
    second is moved to the CPU (what DeepSpeed's universal loader gives back), `place_optimizer_state` puts them
    back, and both take a second step. Asserted: `step` (float32) and the moments are on the parameter's
    device, `step` counts 2, and the resumed copy's parameters equal the uninterrupted copy's."""
    import torch

    from lvm.train.elastic import place_optimizer_state

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device)
    b = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device)
    b.load_state_dict(a.state_dict())
    oa, ob = (torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (a, b))
    x = torch.randn(16, 32, device=device)

    def step(m, o):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()

    step(a, oa)
    step(b, ob)
    for state in ob.state.values():
        for k, v in list(state.items()):
            if torch.is_tensor(v):
                state[k] = v.cpu()
    place_optimizer_state(ob)
    placed = [(str(p.device), str(s["step"].device), str(s["step"].dtype).removeprefix("torch."),
               str(s["exp_avg"].device)) for p, s in ob.state.items()]
    step(a, oa)
    step(b, ob)
    states = list(ob.state.items())
    return {"placed": placed[0] if placed else None, "params": len(states),
            "on_device": bool(states) and all(s["step"].device == p.device and s["step"].dtype == torch.float32
                                              and s["exp_avg"].device == p.device == s["exp_avg_sq"].device
                                              for p, s in states),
            "steps": sorted({float(s["step"]) for _, s in states}),
            "same_as_uninterrupted": all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))}


def compile_check(device, backend="inductor", preset: str = "tiny") -> dict:
    """`compile_layers` (`lvm.model.kernels`) on a `preset` model on `device` (bf16 on CUDA), ZeRO-2 as training
    here runs it; one training forward and backward. `said`: the lines it reported (one: compiled at the first
    forward, or fell back to eager); `compiled`: it said the layers compiled; `loss_diff`: |loss compiled - eager|."""
    import torch
    import torch._dynamo
    from transformers import LlamaForCausalLM

    from lvm.model.kernels import compile_layers
    from lvm.model.presets import llama_config

    torch._dynamo.reset()  # compile afresh: the first forward is the one that says
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = llama_config(preset, 256)
    torch.manual_seed(0)
    eager = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").to(device, dtype)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").to(device, dtype)
    model.load_state_dict(eager.state_dict())
    said: list[str] = []
    setup = compile_layers(model, zero_stage=2, report=said.append, backend=backend)
    ids = torch.randint(0, cfg.vocab_size, (2, 128), device=device)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    with torch.no_grad():
        ref = eager(input_ids=ids, labels=ids, use_cache=False).loss
    ok = len(said) == 1 and said[0].startswith("compile: the ") and "compiled at the first forward" in said[0]
    return {"setup": setup, "said": said, "compiled": ok, "loss_diff": abs(float(loss.detach()) - float(ref)),
            "dtype": str(dtype).removeprefix("torch.")}


def step_fixes(rep: Report, cuda: bool, compile_backend="inductor") -> None:
    """One row for each fix that only a GPU shows: the CUDA generator restored on resume, fused AdamW stepping
    after a universal-checkpoint load, and torch.compile of the decoder layers compiling (not falling back).
    Without a GPU (--smoke) each runs its CPU part: the row says what it did not check."""
    import torch

    device = torch.device("cuda" if cuda else "cpu")
    cpu_only = "" if cuda else "no GPU (--smoke): "
    data = rep.data.setdefault("fixes", {})

    measure = "RNG state on resume: CUDA generator restored (rank 0; rank 1 on device 0; older per-device state)"
    try:
        r = data["rng"] = rng_resume_check(device)
        if not cuda:
            measure = measure.replace("CUDA generator", "CPU generators")
        checks = {"restored draws equal": r["equal"], "control differs": r["control_differs"],
                  "rank 1's entry onto this device": r["rank1_equal"],
                  "older state with a device index not here": r["old_format_equal"],
                  "only the current device saved": r["current_only"]}
        bad = [k for k, v in checks.items() if not v]
        if bad:
            rep.fail("6 resume", measure, "NOT: " + "; ".join(bad))
        else:
            rep.row("6 resume", measure, "equal", cpu_only + "draws after set_rng_state equal those after the save "
                    "(torch " + ("CUDA, " if cuda else "") + "CPU, Python, NumPy); without restoring they differ; "
                    "an older state with an entry for a device index not here restores without error"
                    + ("" if cuda else "; the CUDA generator is checked by make gpu-check on a GPU"))
    except Exception as e:
        rep.fail("6 resume", measure, error_line(e))

    measure = "fused AdamW after a universal-checkpoint load (state moved to the CPU, place_optimizer_state)"
    try:
        r = data["fused_adamw"] = fused_adamw_resume_check(device)
        checks = {"step and moments on the parameter's device (step float32)": r["on_device"],
                  "step counts 2": r["steps"] == [2.0],
                  "parameters equal the uninterrupted copy's": r["same_as_uninterrupted"]}
        bad = [k for k, v in checks.items() if not v]
        where = "step on {1} ({2}), exp_avg on {3}, parameter on {0}".format(*r["placed"]) if r["placed"] else ""
        if bad:
            rep.fail("6 resume", measure, "NOT: " + "; ".join(bad) + f" ({where})")
        else:
            rep.row("6 resume", measure, "stepped", cpu_only + f"{where}; the second step equals the uninterrupted "
                    f"optimizer's over {r['params']} parameters"
                    + ("" if cuda else "; on the CPU the state is on the parameter's device either way: the move "
                       "back to the GPU is checked by make gpu-check"))
    except Exception as e:
        rep.fail("6 resume", measure, error_line(e))

    measure = f"--compile: decoder layers of the tiny model at the first forward ({device.type})"
    try:
        r = data["compile"] = compile_check(device, compile_backend)
        line = " / ".join(r["said"]) or f"nothing reported at the first forward ({r['setup']})"
        if r["compiled"]:
            rep.row("6 compile", measure, "compiled", f"{cpu_only}{line}; |loss - eager| {r['loss_diff']:.2e} ({r['dtype']})")
        else:  # a fallback on the GPU is a finding
            rep.fail("6 compile", measure, f"fell back: {line}")
    except Exception as e:
        rep.fail("6 compile", measure, error_line(e))
