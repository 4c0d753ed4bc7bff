"""The planner's arithmetic against DeepSpeed's estimators and against bytes really saved for backward."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lvm.plan.activations import activation_bytes, backward_peak_bytes, mask_bytes
from lvm.plan.model_states import model_states
from lvm.plan.setting import DTYPE_BYTES, Setting


def small_configs():
    return [
        LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                    vocab_size=8256, tie_word_embeddings=False),
        LlamaConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=6,
                    vocab_size=8256, tie_word_embeddings=False),
    ]


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 4)])
def test_model_states_match_deepspeed_estimators(monkeypatch, gpus, nodes):
    """Every option DeepSpeed's *_all_live estimators evaluate on a real model equals our arithmetic (1%)."""
    import deepspeed.runtime.zero.stage3 as s3
    import deepspeed.runtime.zero.stage_1_and_2 as s2

    calls = []
    for mod, name, stage in ((s2, "estimate_zero2_model_states_mem_needs", 2), (s3, "estimate_zero3_model_states_mem_needs", 3)):
        orig = getattr(mod, name)

        def spy(*args, _orig=orig, _stage=stage, **kw):
            out = _orig(*args, **kw)
            calls.append((_stage, kw, out[1]))
            return out
        monkeypatch.setattr(mod, name, spy)
    for cfg in small_configs():
        model = LlamaForCausalLM(cfg)
        calls.clear()
        s2.estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=gpus, num_nodes=nodes)
        s3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=gpus, num_nodes=nodes)
        assert len(calls) >= 6
        for stage, kw, ds_gpu in calls:
            if stage == 3 and not kw.get("zero_init", True):
                continue  # GPU bytes do not depend on zero_init
            setting = Setting(stage, 1, False, offload_optimizer=kw["cpu_offload"],  # the estimators: 16-bit accumulation
                              offload_param=stage == 3 and kw["cpu_offload"] and kw["cpu_offload_params"], grad_accum_dtype="bf16")
            p, g, o, _ = model_states(cfg, setting, gpus * nodes, gpus)
            assert abs((p + g + o) - ds_gpu) <= 0.01 * ds_gpu, (stage, kw, p + g + o, ds_gpu)


def saved_bytes(model, ids, ckpt: bool) -> int:
    """Bytes of distinct non-parameter storages autograd saves in one forward (with the loss)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(v for k, v in seen.items() if k not in params)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_activations_within_ten_percent_of_saved_tensors(dtype, ckpt):
    torch.manual_seed(0)
    for cfg in small_configs():
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
        for b, s in ((1, 256), (2, 128), (3, 200)):
            ids = torch.randint(0, 8192, (b, s))
            real = saved_bytes(model, ids, ckpt)
            est = activation_bytes(cfg, b, s, ckpt, dtype)
            assert abs(est - real) <= 0.10 * real, (dtype, ckpt, b, s, est, real)


def packed_positions(b: int, s: int) -> torch.Tensor:
    """Position ids of `--packing sentence`: they restart at every sentence (three per window here)."""
    cuts = [0, s // 3, s // 3 + s // 4, s]
    return torch.cat([torch.arange(cuts[k + 1] - cuts[k]) for k in range(3)]).expand(b, -1).contiguous()


def packed_kwargs(position_ids, model) -> dict:
    """What the trainer passes for `--packing sentence` on the SDPA path (lvm.model.attention)."""
    from lvm.model.attention import packed_attention_kwargs

    if position_ids is None:
        return {}
    return {"position_ids": position_ids, **packed_attention_kwargs(position_ids, "sdpa", model.dtype)}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sentence_packing_mask_is_saved_once(dtype):
    """The trainer's additive block-causal mask is shared by every layer: saved as one storage, b s^2 d bytes."""
    torch.manual_seed(0)
    cfg = small_configs()[0]
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    b, s = 2, 128
    ids = torch.randint(0, 8192, (b, s))
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kwargs = packed_kwargs(packed_positions(b, s), model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False, **kwargs)
    packed = sum(v for k, v in seen.items() if k not in params)
    plain = saved_bytes(model, ids, False)
    d = DTYPE_BYTES[dtype]
    rope_per_sequence = 2 * (cfg.hidden_size // cfg.num_attention_heads) * d * b * s * (1 - 1 / b)
    assert packed - plain == mask_bytes(b, s, d, cfg.num_hidden_layers) + rope_per_sequence == b * s * s * d + rope_per_sequence
    assert activation_bytes(cfg, b, s, False, dtype, attn_mask=True) - activation_bytes(cfg, b, s, False, dtype) == packed - plain


def measured_peak(model, ids, position_ids=None) -> int:
    """Peak bytes of activations and temporaries (not parameters or their gradients) in one forward + backward,
    the packing mask built inside (it lives as long as the batch)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(model)
    with mt:
        model(input_ids=ids, labels=ids, use_cache=False, **packed_kwargs(position_ids, model)).loss.backward()
    peak = {str(k).split(".")[-1]: v for k, v in mt.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    model.zero_grad(set_to_none=True)
    return peak["ACT"] + peak["TEMP"]


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("packing", ["concat", "sentence"])
def test_backward_peak_within_ten_percent_of_measured(ckpt, packing):
    """Saved activations + the backward peak (logits gradients, or a checkpointed layer's recompute) against the
    live tensors measured by PyTorch's MemTracker, for a head-dominated and a layer-dominated shape."""
    torch.manual_seed(0)
    shapes = [small_configs()[1], LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4,
                                              num_key_value_heads=4, vocab_size=64, tie_word_embeddings=False)]
    for cfg in shapes:
        for dtype in ("fp32", "bf16"):
            model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
            model = model.to(torch.bfloat16) if dtype == "bf16" else model
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            b, s = 2, 256
            ids = torch.randint(0, min(cfg.vocab_size, 8192), (b, s))
            pos = packed_positions(b, s) if packing == "sentence" else None
            real = measured_peak(model, ids, pos)
            mask = packing == "sentence"
            est = activation_bytes(cfg, b, s, ckpt, dtype, mask) + backward_peak_bytes(cfg, b, s, ckpt, dtype, mask)
            assert abs(est - real) <= 0.10 * real, (cfg.hidden_size, dtype, est, real)


def test_bf16_under_zero_plans_the_fp32_gradient_buffers():
    """bf16 with fp32 accumulation (what training resolves): ZeRO-1 is DeepSpeed's BF16_Optimizer, a full-size fp32
    gradient buffer on every rank beside the bf16 gradients, and an all-reduce copy at the boundary; ZeRO-2 keeps
    only this rank's fp32 partition. A ds_config that accumulates in bf16 keeps DeepSpeed's classic accounting."""
    from lvm.model.presets import count_parameters, model_shape
    from lvm.plan.memory import breakdown
    from lvm.plan.model_states import largest_layer_params

    cfg = model_shape("1b")
    n = count_parameters(cfg)
    for dp in (1, 8):
        assert model_states(cfg, Setting(1, 1, False), dp)[1] == int(6 * n)
        assert model_states(cfg, Setting(1, 1, False, grad_accum_dtype="bf16"), dp)[1] == int(2 * n + 4 * n / dp)
        assert model_states(cfg, Setting(2, 1, False), dp)[1] == int(4 * n / dp)
        assert model_states(cfg, Setting(2, 1, False, grad_accum_dtype="bf16"), dp)[1] == int(6 * n / dp)
        assert model_states(cfg, Setting(1, 1, False, offload_optimizer=True), dp)[1] == 0  # the ZeRO optimizer, offloaded
    # the boundary all-reduce (6 B per element of up to 5e8 + one tensor) needs what the backward's tensors leave
    small = breakdown(cfg, Setting(1, 1, True, reduce_bucket=10**6, allgather_bucket=10**6), 512, 1)
    copy = 6 * min(n, 500_000_000 + largest_layer_params(cfg))  # 1b: more than one all-reduce bucket
    assert small.buckets == copy - small.activations - small.attention_mask - small.backward_peak > 0
    big = breakdown(cfg, Setting(1, 8, False), 4096, 1)
    assert big.buckets == 0  # the backward phase's activations outweigh it
    assert breakdown(cfg, Setting(2, 1, True, reduce_bucket=10**6, allgather_bucket=10**6), 512, 8).buckets == 6 * 10**6
