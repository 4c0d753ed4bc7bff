"""Step 0: packed sentences score as each sentence alone on the GPU attention path, and a control that leaks."""

from __future__ import annotations

from pathlib import Path

try:
    import numpy as np
except ImportError:  # reported by no_gpu_reason with the rest of what is missing
    np = None

from gpu_checks.report import Report


def packing_proof(model, b, impl: str, dtype, device) -> dict:
    """Logits of every sentence of the packed micro-batch `b` vs the sentence run alone, under `impl`:

    - `max_abs_diff`: with the packing passed as training passes it (`packed_attention_kwargs`): must be within `bound`;
    - `control`: the same rows without any packing (no mask or varlen arguments, no restarting position ids: plain
      causal attention over the row), over the sentences after the first of their row (the first attends to itself
      only, packed or not): must exceed `bound`, else the comparison could not tell packed sentences that leak from
      ones that do not (a model whose positions never mix would pass anything);
    - `guess` (flash_attention_2 only, informative): position ids without the varlen arguments, transformers' own
      detection of packing, which it makes for flash-attention only when the micro-batch has one row.

    The bound is 2% of the largest packed logit (bf16: masked and unmasked kernels round differently)."""
    import torch

    from lvm.model.attention import packed_attention_kwargs
    from lvm.model.vocab import BOS_ID, EOS_ID

    ids, pos = b.input_ids.to(device), b.position_ids.to(device)
    worst, control, guess, n, later = 0.0, 0.0, None, 0, 0
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False, **packed_attention_kwargs(pos, impl, dtype)).logits
        plain = model(input_ids=ids, use_cache=False).logits
        guessed = model(input_ids=ids, position_ids=pos, use_cache=False).logits if impl == "flash_attention_2" else None
        for r in range(ids.shape[0]):
            row = b.input_ids[r].numpy()
            for k, s in enumerate(np.flatnonzero(row == BOS_ID)):
                e = int(s) + int(np.flatnonzero(row[s:] == EOS_ID)[0]) + 1
                alone = model(input_ids=ids[r : r + 1, s:e], use_cache=False).logits[0]
                worst = max(worst, float((packed[r, s:e] - alone).abs().max()))
                if k:
                    control = max(control, float((plain[r, s:e] - alone).abs().max()))
                    later += 1
                    if guessed is not None:
                        guess = max(guess or 0.0, float((guessed[r, s:e] - alone).abs().max()))
                n += 1
    scale = float(packed.abs().max())
    bound = max(0.02 * scale, 1e-4)
    return {"max_abs_diff": worst, "control": control, "guess": guess, "sentences": n, "later_sentences": later,
            "scale": scale, "bound": bound, "equal": worst <= bound, "control_leaks": later > 0 and control > bound}


def step_packing(rep: Report, out: Path, cuda: bool, preset: str = "100m") -> None:
    """Packed sentences stay apart on this device: for each attention implementation that runs here, the logits
    of every sentence of a packed micro-batch of 3 rows equal those of the sentence run alone, and, as a control,
    differ without the packing (`packing_proof`). Both are asserted."""
    import torch
    from transformers import LlamaForCausalLM

    from lvm.data.mixture import DistributedLoader
    from lvm.data.shards.format import write_shard
    from lvm.data.shards.shard_set import open_shards
    from lvm.data.windows.source import SourceWindows
    from lvm.model.attention import flash_attn_unavailable
    from lvm.model.presets import llama_config

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rng = np.random.default_rng(3)
    folder = out / "packing"
    rows = [{"tokens": rng.integers(0, 8192, 256 * k, dtype=np.uint16), "n_images": k, "kind": "video", "id": f"s{i}"}
            for i, k in enumerate([1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 2])]
    write_shard(folder / "part-000.arrow", rows)
    b = DistributedLoader(SourceWindows(open_shards(folder), 800, "sentence", seed=0), micro_batch=3).next_batch()
    impls = ["sdpa"] + (["flash_attention_2"] if flash_attn_unavailable(device, dtype) is None else [])
    for impl in impls:
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(llama_config(preset, 800), attn_implementation=impl).to(device, dtype).eval()
        r = packing_proof(model, b, impl, dtype, device)
        if not (r["equal"] and r["control_leaks"]):
            rep.failed.append(f"packing under {impl}")
        note = (f"{'equal' if r['equal'] else 'NOT equal'} (bound 2% of the largest logit, {r['scale']:.1f}); "
                f"{r['sentences']} sentences in 3 rows; control without the packing: {r['control']:.3f} over "
                f"{r['later_sentences']} later sentences, "
                + ("leaks as it must" if r["control_leaks"] else "control does not leak: the comparison shows nothing"))
        if r["guess"] is not None:
            note += f"; position ids without the varlen arguments: {r['guess']:.3f} (transformers' guess, micro-batch > 1)"
        rep.row("0 packing", f"packed sentences vs each alone, {impl}, {str(dtype).removeprefix('torch.')}",
                f"max |diff| {r['max_abs_diff']:.4f}", note)
        rep.data.setdefault("packing", {})[impl] = {k: v for k, v in r.items() if k not in ("equal", "control_leaks")}
        del model
