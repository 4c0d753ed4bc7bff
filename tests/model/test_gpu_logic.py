"""GPU-only decisions checked on a CPU: device placement, MFU arithmetic and peaks, optional kernels'
fallbacks, and torch.compile of the decoder layers (which runs on a CPU too)."""

import subprocess
import sys
import time

import pytest
import torch
from transformers import LlamaForCausalLM

from lvm.launch_env import LaunchEnv, local_device
from lvm.model.kernels import apply_kernels, compile_layers
from lvm.model.presets import count_parameters, flops_per_token, llama_config, matmul_parameters
from lvm.model.vocab import PAD_ID
from lvm.train.metrics import Throughput, device_peak_flops, peak_tflops_of, window_flops, window_work
from tests.train.conftest import ENV, REPO, base_args, free_port


@pytest.mark.parametrize("visible,local_rank,expect", [(8, 3, 3), (1, 3, 0), (2, 5, 1), (4, 0, 0)])
def test_each_rank_gets_a_visible_gpu(monkeypatch, visible, local_rank, expect):
    """cuda:LOCAL_RANK where every GPU of the node is visible; cuda:0 where the cluster shows a task one GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert local_device(LaunchEnv(rank=local_rank, local_rank=local_rank, world_size=8)) == torch.device("cuda", expect)


def test_no_gpu_means_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device(LaunchEnv(local_rank=3)) == torch.device("cpu")


def test_peaks_by_gpu_name(monkeypatch):
    assert peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.4      # SXM
    assert peak_tflops_of("NVIDIA H100 PCIe") == 756.5
    assert peak_tflops_of("NVIDIA H100 NVL") == 835.5            # not the SXM figure
    assert peak_tflops_of("NVIDIA H200") == 989.4 and peak_tflops_of("NVIDIA H200 NVL") == 835.5
    assert peak_tflops_of("NVIDIA GH200 480GB") == 989.4
    assert peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops_of("NVIDIA A10") == 125.0
    assert peak_tflops_of("NVIDIA L4") == 121.0 and peak_tflops_of("NVIDIA L40S") == 362.05
    assert peak_tflops_of("NVIDIA H100 80GB HBM3", "fp32") is None  # MFU is a bf16/fp16 figure
    assert peak_tflops_of("Some Future GPU") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 NVL")
    assert device_peak_flops("bf16") == 835.5e12
    monkeypatch.setenv("LVM_PEAK_TFLOPS", "500")
    assert device_peak_flops("bf16") == 500e12


def test_model_flops_leave_out_the_input_embedding_and_pad():
    cfg = llama_config("1b", 4096)
    n = count_parameters(cfg)
    assert matmul_parameters(cfg) == n - cfg.vocab_size * cfg.hidden_size  # the lookup is no matmul; the head is
    assert flops_per_token(cfg, 4096) == 6 * (n - 8256 * 2048) + 12 * 22 * 2048 * 4096
    # a concatenated window: every token attends over the whole window
    ids = torch.randint(0, 8192, (2, 4096))
    tokens, sq = window_work(ids, None, PAD_ID)
    assert (tokens, sq) == (8192, 2 * 4096**2)
    assert window_flops(cfg, tokens, sq) == pytest.approx(8192 * flops_per_token(cfg, 4096), rel=1e-12)
    # a packed window: sentences of 1026 and 2050 tokens, then 1020 PAD
    pos = torch.cat([torch.arange(1026), torch.arange(2050), torch.arange(1020)])[None]
    ids = torch.cat([torch.randint(0, 8192, (3076,)), torch.full((1020,), PAD_ID)])[None]
    tokens, sq = window_work(ids, pos, PAD_ID)
    assert (tokens, sq) == (3076, 1026**2 + 2050**2)
    assert window_flops(cfg, tokens, sq) < flops_per_token(cfg, 4096) * 3076 < flops_per_token(cfg, 4096) * 4096


def test_throughput_window_leaves_out_paused_time():
    t = Throughput()
    time.sleep(0.05)
    with t.paused():
        time.sleep(0.3)  # validation or a checkpoint
    t.add(1000, 1200, 5e12)
    r = t.read(peak_flops=100e12, world_size=2)
    assert 0.04 < r["seconds"] < 0.2
    assert r["tokens_per_s"] == pytest.approx(1000 / r["seconds"]) and r["window_tokens_per_s"] > r["tokens_per_s"]
    assert r["mfu"] == pytest.approx(5e12 / r["seconds"] / 200e12)
    assert Throughput().read(None)["mfu"] is None


def test_optional_kernels_fall_back_with_one_line():
    model = LlamaForCausalLM._from_config(llama_config("tiny", 64), attn_implementation="sdpa")
    forward = model.model.norm.forward
    line = apply_kernels(model, "liger", torch.device("cpu"))
    assert line.startswith("--kernels liger: ") and line.endswith("using transformers' own modules") and "\n" not in line
    assert model.model.norm.forward == forward  # nothing half applied
    assert apply_kernels(model, "none", torch.device("cpu")) == "kernels: transformers' own modules"
    line = compile_layers(model, zero_stage=3)
    assert line.startswith("--compile: ZeRO-3") and line.endswith("running eagerly")
    with pytest.raises(ValueError, match="--kernels"):
        apply_kernels(model, "apex", torch.device("cpu"))


def eager_and_compiled(capsys, layers: int = 1):
    """A tiny model and a copy whose decoder layers `compile_layers` set for torch.compile; what it said, in lines."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = llama_config("tiny", 64)
    cfg.num_hidden_layers = layers
    eager = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    compiled = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    compiled.load_state_dict(eager.state_dict())
    capsys.readouterr()
    return eager, compiled, compile_layers(compiled, zero_stage=2)


def test_compiled_layers_compute_what_eager_layers_do(capsys):
    eager, compiled, setup = eager_and_compiled(capsys)
    ids = torch.randint(0, 8192, (2, 64))
    a, b = (m(input_ids=ids, labels=ids, use_cache=False) for m in (eager, compiled))
    said = [setup, *capsys.readouterr().out.splitlines()]
    assert not any("eager" in x for x in said), said  # nothing fell back
    assert sum(x.startswith("compile: the 1 decoder layers compiled at the first forward") for x in said) == 1, said
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-4)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(eager.model.layers[0].mlp.up_proj.weight.grad, compiled.model.layers[0].mlp.up_proj.weight.grad,
                               atol=1e-5, rtol=1e-4)


def test_compile_that_fails_says_so_in_one_line_and_runs_eagerly(capsys, monkeypatch):
    """torch.compile failing (here: inductor raises, as it does without a working C++/Triton toolchain) is one line at
    the first forward naming the failure and the eager fallback; the layers compute what eager layers do."""
    import torch._inductor.compile_fx as compile_fx

    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler here")

    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    eager, compiled, setup = eager_and_compiled(capsys, layers=2)
    ids = torch.randint(0, 8192, (2, 64))
    for _ in range(2):  # said once, not at every forward
        a, b = (m(input_ids=ids, labels=ids, use_cache=False) for m in (eager, compiled))
    said = [setup, *capsys.readouterr().out.splitlines()]
    fell_back = [x for x in said if "eager" in x]
    assert len(fell_back) == 1 and fell_back[0].startswith("--compile: ") and "no working C++ compiler here" in fell_back[0], said
    assert "\n" not in fell_back[0] and not any(x.startswith("compile: the") for x in said)
    torch.testing.assert_close(a.logits, b.logits)


def test_pretrain_says_what_it_could_not_use(train_shards, tmp_path):
    """On a CPU: flash-attention-2 and Liger fall back to sdpa and transformers' modules, one line each; --compile
    says at the first forward, in one line, whether the layers compiled."""
    r = subprocess.run([sys.executable, "launch/pretrain.py", *base_args(train_shards, tmp_path / "run", "--max-steps", "3",
                        "--ds_config", "ds_configs/zero2.json", "--packing", "sentence", "--attention", "flash_attention_2",
                        "--kernels", "liger", "--compile")], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**ENV, "MASTER_PORT": str(free_port())})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert sum("--attention flash_attention_2: " in x and x.endswith("; using sdpa") for x in lines) == 1
    assert sum("--kernels liger: " in x and x.endswith("using transformers' own modules") for x in lines) == 1
    said = [x for x in lines if "] compile: the " in x or "] --compile: " in x]
    assert len(said) == 1, lines  # this CPU compiles (inductor with its C++ compiler): "compiled", not "eagerly"
    assert "decoder layers compiled at the first forward" in said[0] and "eager" not in said[0], said
    assert any(x.endswith("attention: sdpa (packed sentences: block-diagonal causal mask)") for x in lines)


def test_no_fused_loss_on_a_zero3_partitioned_model():
    """Under ZeRO-3, lm_head.weight outside the head's forward is the empty local shard (what Liger's fused linear
    cross-entropy would read): the plain head and loss are kept, and the log line says why."""
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "tests/model/zero3_model_worker.py"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=env)
    rows = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and rows, r.stderr[-3000:]
    import json

    x = json.loads(rows[-1][len("RESULT "):])
    assert x["partitioned"] and x["head_numel"] == 0  # what the fused kernel would have been handed
    assert "ZeRO-3" in x["why"] and "lm_head.weight" in x["why"]
    assert not x["plain_partitioned"] and x["plain_why"] is None and "per-source" in x["plain_logits_why"]
