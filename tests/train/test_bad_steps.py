"""A non-finite loss skips the update: weights, Adam's moments and step counts, and the schedule are untouched.

Real runs: a model (loaded with --init-from) whose embedding row of one visual code is infinite gives a
NaN loss exactly for the windows that hold that code, and a finite one elsewhere. Checkpoints after every
step show that a skipped step leaves every tensor of the optimizer and the model as it was, in fp32
(2 ranks, ZeRO-2) and in bf16 with DeepSpeed's own overflow check switched off (ZeRO-2,
`bf16.check_grad_overflow: false`), where only the update gate stands between a NaN gradient and Adam's moments.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lvm.train.bad_steps import classify
from lvm.train.schedule import Schedule
from tests.train.conftest import REPO, base_args, read_metrics
from tests.train.one_rank import run_train_any as run_train
from tests.train.test_init_from import lvm_like_folder

POISON = 8191  # a visual code; its embedding row is made infinite


@pytest.fixture(scope="module")
def poisoned(train_shards, tmp_path_factory):
    """Shards where every 8th sentence holds the poison code, and a model folder with that row infinite."""
    from lvm.data.shards.format import write_shard
    from lvm.data.shards.shard_set import read_tokenizer_info

    root = tmp_path_factory.mktemp("poison")
    data = root / "shards"
    info = read_tokenizer_info(train_shards)
    kind, _, path = info["spec"].partition(":")
    if path and not Path(path).is_absolute():
        info["spec"] = f"{kind}:{(train_shards / path).resolve()}"
    rng = np.random.default_rng(11)
    rows = []
    for i in range(48):
        tokens = rng.integers(0, 512, 256).astype(np.uint16)  # a small alphabet: the loss falls quickly
        if i % 8 == 5:
            tokens[100] = POISON
        rows.append({"tokens": tokens, "n_images": 1, "kind": "image", "id": f"s{i}"})
    write_shard(data / "train" / "s-00000.arrow", rows)
    (data / "tokenizer.json").write_text(json.dumps(info))
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        folder = root / f"model-{str(dtype).split('.')[-1]}"
        lvm_like_folder(folder, dtype=dtype)
        from safetensors.torch import load_file, save_file

        sd = load_file(folder / "model.safetensors")
        sd["model.embed_tokens.weight"][POISON] = float("inf")
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        models[dtype] = folder
    return data, models


def tensors(obj, prefix=""):
    """Every tensor in a checkpoint file's object tree, by path; learning rates aside (checked on their own)."""
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("param_groups", "lr_scheduler", "rng"):  # rates checked apart; RNG is not training state
                out.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}/{i}"))
    return out


def checkpoint_tensors(tag_dir: Path) -> dict:
    out = {}
    for f in sorted(tag_dir.glob("*.pt")):
        out.update(tensors(torch.load(f, map_location="cpu", weights_only=False), f.name))
    return out


def lrs(tag_dir: Path) -> set[float]:
    """The learning rates the optimizer state of a tag carries (those of its last update)."""
    found = set()

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "param_groups":
                    found.update(float(g["lr"]) for g in v)
                else:
                    walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
    for f in tag_dir.glob("*optim_states.pt"):
        walk(torch.load(f, map_location="cpu", weights_only=False))
    return found


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("case", ["fp32-zero2-2ranks", "bf16-zero2-unchecked"])
def test_a_nonfinite_loss_leaves_state_and_schedule_alone(poisoned, tmp_path, case):
    data, models = poisoned
    steps = 8
    if case == "fp32-zero2-2ranks":
        nproc, ds, model = 2, "ds_configs/zero2.json", models[torch.float32]
        extra = []
    else:  # bf16 with DeepSpeed's gradient-overflow check off: NaN gradients would reach Adam but for the gate
        nproc, model = 1, models[torch.bfloat16]
        cfg = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
        cfg["bf16"] = {"enabled": "auto", "check_grad_overflow": False}
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps(cfg))
        extra = ["--precision", "bf16"]
    run = tmp_path / "run"
    r = run_train(nproc, base_args(data, run, "--ds_config", str(ds), "--init-from", str(model), "--max-steps", str(steps),
                                   "--save-every", "1", "--keep-last", "100", "--max-bad-steps", str(steps), "--warmup-steps", "3",
                                   *extra))
    m = read_metrics(run)
    skipped = [s for s in range(1, steps + 1) if f"step {s}: non-finite loss, update skipped" in r.stdout]
    assert skipped and len(skipped) < steps - 1, r.stdout[-3000:]
    assert m[steps]["skipped_steps"] == len(skipped)
    sched = Schedule("cosine", 3e-3, 3e-4, 3, steps)
    ckpts = run / "checkpoints"
    for s in range(1, steps + 1):
        tag = ckpts / f"step_{s:08d}"
        got = lrs(tag)  # step s ran at lr_at(s - 1), skipped or not
        assert got and all(x == pytest.approx(sched.lr_at(s - 1), rel=1e-9) for x in got), (s, got)
        assert m[s]["lr"] == pytest.approx(sched.lr_at(s - 1), rel=1e-12)
    for s in skipped:
        if s == 1:
            continue  # nothing saved before the first step
        before, after = checkpoint_tensors(ckpts / f"step_{s - 1:08d}"), checkpoint_tensors(ckpts / f"step_{s:08d}")
        assert before.keys() == after.keys()
        changed = [k for k in before if not same(before[k], after[k])]
        assert not changed, (s, changed[:5])
        nan = [k for k, v in after.items() if v.is_floating_point() and v.isnan().any()]
        assert not nan, (s, nan[:5])  # no NaN anywhere (the poison row is inf, never NaN)
    clean = [s for s in range(2, steps + 1) if s not in skipped]
    assert clean
    s = clean[0]
    before, after = checkpoint_tensors(ckpts / f"step_{s - 1:08d}"), checkpoint_tensors(ckpts / f"step_{s:08d}")
    assert any(not same(before[k], after[k]) for k in before)  # a clean step does update (the test can fail)


def test_classify():
    assert classify(False, True, "fp32") is None
    assert classify(True, True, "bf16") == "loss"
    assert classify(False, False, "bf16") == "grad"
    assert classify(False, False, "fp16") == "overflow"  # a loss-scale overflow is not a bad step
