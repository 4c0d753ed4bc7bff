"""The context-frames curve reaches the paper's 15 frames with a 4096-token window, and the model never
sees a position past its window."""

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from lvm.data.shards.format import write_shard
from lvm.data.shards.shard_set import open_shards
from lvm.eval.generate import Sampling, fit_prompt, sample_codes
from lvm.eval.perplexity import results, score
from lvm.model.presets import llama_config
from lvm.model.vocab import BOS_ID


def test_sixteen_frames_give_fifteen_context_frames(tmp_path):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 8192, 16 * 256, dtype=np.uint16)
    write_shard(tmp_path / "v.arrow", [{"tokens": video, "n_images": 16, "kind": "video", "id": "v"}])
    table = open_shards(tmp_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(llama_config("tiny", 4096), attn_implementation="sdpa").eval()
    lengths = []
    model.register_forward_pre_hook(lambda m, args, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    res = results(score(model, table, 4096, progress=False))
    assert list(res["perplexity_by_context_frames"]) == [str(k) for k in range(16)]  # 0 ... 15 context frames
    assert max(lengths) == 4096
    # independently: the 16th frame (15 context frames) from positions 3840..4095 of BOS + the first 4095 codes
    ids = torch.from_numpy(np.concatenate([[BOS_ID], video.astype(np.int64)]))[None]
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids[:, :-1]).logits[0].double(), -1)
    nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
    assert abs(res["perplexity_by_context_frames"]["15"] / np.exp(float(nll[15 * 256 :].mean())) - 1) < 1e-4


def test_generation_fills_the_window():
    """BOS + 1 prompt image + one new image = 513 tokens in a 512 window: the last sampled token is never an input
    (with 4096: 15 prompt frames before the 16th)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(llama_config("tiny", 512), attn_implementation="sdpa").eval()
    prompt, dropped = fit_prompt(torch.randint(0, 8192, (3, 256)), 512, 1)
    assert len(prompt) == 1 and dropped == 2
    assert len(fit_prompt(torch.zeros(20, 256, dtype=torch.long), 4096, 1)[0]) == 15
    seen = []

    def positions(module, args, kw):  # positions the forward covers (the cache kwarg is `cache` from transformers 5.24)
        if kw.get("position_ids") is not None:
            seen.append(int(kw["position_ids"].max()) + 1)
            return
        cache = kw.get("cache", kw.get("past_key_values"))
        seen.append(kw["input_ids"].shape[1] + (cache.get_seq_length() if cache is not None else 0))

    model.register_forward_pre_hook(positions, with_kwargs=True)
    out = sample_codes(model, prompt, Sampling(temperature=0, use_cache=True))
    assert out.shape == (1, 1, 256) and max(seen) == 512


def test_weights_cast_for_a_gpu_record_their_dtype_and_keep_fp32_buffers():
    """bf16 weights (as evaluation casts them on a GPU), RoPE buffers kept fp32, and the config saying bf16, which
    transformers reads when flash_attention_2 is set (a float32 config makes it warn that flash-attention cannot run)."""
    from lvm.eval.model_io import _cast_parameters

    model = LlamaForCausalLM._from_config(llama_config("tiny", 64), attn_implementation="sdpa").eval()
    assert model.config.dtype in (None, torch.float32)  # from_pretrained(dtype=float32) records float32
    _cast_parameters(model, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in model.buffers()} == {torch.float32}
    assert model.config.dtype == torch.bfloat16
