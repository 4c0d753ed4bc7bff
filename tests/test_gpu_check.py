"""`make gpu-check` without a GPU: one line and a non-zero exit; its table goes between the markers of
docs/benchmarks.md and nowhere else; its option list follows what is installed."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
gpu_check = pytest.importorskip("gpu_check")
from gpu_checks import data, fixes, learning, packing, report, throughput  # noqa: E402


def test_without_a_gpu_one_line_and_exit_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: make gpu-check would run")
    r = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: make gpu-check needs a CUDA GPU"), r.stderr
    m = subprocess.run(["make", "-o", "venv", "-o", ".venv/.installed", "gpu-check", f"PY={sys.executable}"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert m.returncode != 0 and lines[0] in m.stderr.splitlines()


def test_table_replaces_only_the_marked_block(tmp_path):
    md = tmp_path / "benchmarks.md"
    md.write_text(f"# Benchmarks\n\nCPU table\n\n## GPU check\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    report.put_in_benchmarks(md, "| a | b |\n")
    text = md.read_text()
    assert "old" not in text and "| a | b |" in text and text.startswith("# Benchmarks\n\nCPU table") and text.endswith("\nafter\n")
    report.put_in_benchmarks(md, "| c |\n")
    assert md.read_text().count(report.BEGIN) == 1 and "| c |" in md.read_text() and "| a | b |" not in md.read_text()
    fresh = tmp_path / "none.md"
    fresh.write_text("# Benchmarks\n")
    report.put_in_benchmarks(fresh, "| x |\n")
    assert "## GPU check (`make gpu-check`)" in fresh.read_text() and "| x |" in fresh.read_text()
    assert (REPO / "docs" / "benchmarks.md").read_text().count(report.BEGIN) == 1


def test_options_follow_what_is_installed():
    f = throughput.option_flags
    assert f("sdpa", False, False) == ["--attention", "sdpa"]
    assert f("flash_attention_2", False, True) is None and f("liger", True, False) is None
    assert f("all", False, False) is None  # the same as compile
    assert f("compile", True, False) == ["--attention", "flash_attention_2", "--compile"]
    assert f("all", True, True) == ["--attention", "flash_attention_2", "--compile", "--kernels", "liger"]
    assert throughput.describe_option(f("all", True, True)) == "flash_attention_2 + liger + compile"


def packing_report(tmp_path, **kw):
    rep = report.Report()
    packing.step_packing(rep, tmp_path, False, **kw)  # the GPU check's packing proof, on this CPU (sdpa, fp32)
    return rep


def test_packing_proof_passes_and_its_control_leaks(tmp_path):
    """Packed sentences equal each sentence alone, and the control (the same rows without any packing: plain causal
    attention over the row) differs from them beyond the same bound: the comparison can tell the two apart."""
    rep = packing_report(tmp_path, preset="tiny")
    assert rep.failed == [], rep.rows
    d = rep.data["packing"]["sdpa"]
    assert d["max_abs_diff"] <= d["bound"] < d["control"] and d["later_sentences"] > 0
    assert "control" in rep.rows[0][3] and "leaks" in rep.rows[0][3]


def test_a_packing_proof_whose_control_does_not_leak_fails(tmp_path, monkeypatch):
    """A model whose positions never mix (no decoder layer, so no attention) passes 'packed equals alone' whatever the
    packing: the proof must fail on its control instead of passing."""
    import lvm.model.presets as presets

    real = presets.llama_config

    def no_layers(name, seq_len):
        cfg = real("tiny", seq_len)
        cfg.num_hidden_layers = 0
        return cfg

    monkeypatch.setattr(presets, "llama_config", no_layers)
    rep = packing_report(tmp_path)
    assert rep.failed == ["packing under sdpa"], rep.rows
    assert "control does not leak" in rep.rows[0][3]


FIX_ROWS = [("6 resume", "RNG state on resume"), ("6 resume", "fused AdamW after a universal-checkpoint load"),
            ("6 compile", "--compile: decoder layers")]


def test_the_three_fix_rows_are_in_a_smoke_report(tmp_path, monkeypatch):
    """A --smoke run reports one row for each GPU-only fix (RNG on resume, fused AdamW after a universal load,
    --compile), each run on the CPU and saying what it left to the GPU. The other steps are stubbed out here (they
    have their own tests) and the compile row uses dynamo's eager backend, which is quick."""
    import json

    real = fixes.compile_check
    monkeypatch.setattr(fixes, "compile_check", lambda device, backend="inductor": real(device, "eager"))
    monkeypatch.setattr(gpu_check, "step_packing", lambda *a, **k: None)
    monkeypatch.setattr(gpu_check, "step_encode_and_shards", lambda *a, **k: None)
    monkeypatch.setattr(gpu_check, "step_throughput", lambda *a, **k: None)
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    found = json.loads((tmp_path / "gpu_check.json").read_text())
    assert found["failed"] == [] and len(found["rows"]) == 3, found["rows"]
    for (section, measure), row in zip(FIX_ROWS, found["rows"], strict=True):
        assert row[0] == section and row[1].startswith(measure) and row[3].startswith("no GPU (--smoke): "), row
    assert [r[2] for r in found["rows"]] == ["equal", "stepped", "compiled"]
    assert "CPU generators" in found["rows"][0][1] and "checked by make gpu-check" in found["rows"][0][3]
    assert "compiled at the first forward" in found["rows"][2][3]
    checked = found["fixes"]
    assert all(checked["rng"].values()), checked["rng"]
    assert checked["fused_adamw"]["steps"] == [2.0] and checked["fused_adamw"]["same_as_uninterrupted"]
    assert "| 6 compile |" in (tmp_path / "gpu_check.md").read_text()


def test_rng_check_fails_when_rank_entries_are_mixed_up(monkeypatch):
    """The RNG check can fail: a set_rng_state that always restores rank 0's entry breaks 'rank 1 on device 0'."""
    import lvm.train.checkpoint as ckpt

    real = ckpt.set_rng_state
    monkeypatch.setattr(ckpt, "set_rng_state", lambda state, rank=0: real(state, 0))
    rep = report.Report()
    fixes.step_fixes(rep, False, compile_backend="eager")
    assert rep.failed == [f"6 resume: {rep.rows[0][1]}"], rep.rows
    assert rep.rows[0][2] == "failed" and "rank 1's entry onto this device" in rep.rows[0][3]


def test_a_compile_fallback_fails_its_row():
    """--compile falling back to eager is a finding on a GPU: the row fails and carries the fallback line."""

    def broken(gm, example_inputs):
        raise RuntimeError("no working compiler here")

    rep = report.Report()
    fixes.step_fixes(rep, False, compile_backend=broken)
    assert rep.failed == [f"6 compile: {rep.rows[2][1]}"], rep.rows
    assert rep.rows[2][2] == "failed" and rep.rows[2][3].startswith("fell back: --compile: torch.compile failed")
    assert "no working compiler here" in rep.rows[2][3]


def verdict(tmp_path, curve, asserted, psnr=(13.0, 11.0)):
    shards = data.random_source(tmp_path / "shards", 4, frames=4)  # random codes: unigram entropy ~9 nats
    rep = report.Report()
    rep.data["learning"] = {}
    rows = [{"step": 10 * i, "loss": 9.0 - i} for i in range(1, 7)]  # ends at 3.0
    learning.learning_verdict(rep, rows, {"perplexity_by_context_frames": {str(k): v for k, v in curve.items()}}, shards,
                               psnr, asserted)
    return rep


def test_the_learning_step_asserts_the_demo_checks(tmp_path):
    """Step 5 applies make demo's checks (lvm.eval.learning): a model that learned passes; a flat context curve fails
    the step on a GPU, and is reported but not asserted by --smoke."""
    rep = verdict(tmp_path, {0: 1000.0, 1: 100.0, 2: 95.0, 3: 90.0}, asserted=True)
    assert rep.failed == [] and [r[2] for r in rep.rows[1:]] == ["yes"] * 4, rep.rows
    flat = {0: 1000.0, 1: 990.0, 2: 985.0, 3: 980.0}
    rep = verdict(tmp_path / "a", flat, asserted=True, psnr=(10.0, 11.0))
    assert len(rep.failed) == 2 and all(f.startswith("5 learning: ") for f in rep.failed), rep.failed
    assert any("3 context frames is 0.98" in f for f in rep.failed) and any("prompt frames" in f for f in rep.failed)
    rep = verdict(tmp_path / "b", flat, asserted=False)
    assert rep.failed == [] and [r[2] for r in rep.rows[1:]].count("no") == 1
    assert all(r[3] == "--smoke: reported, not asserted" for r in rep.rows[1:])
