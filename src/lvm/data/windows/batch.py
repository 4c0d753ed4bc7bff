"""What the loader hands the model: a micro-batch of windows (`Batch`, its targets already shifted) and the loss of
a forward over it (`causal_lm_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor
    targets: torch.Tensor  # targets[b, t]: the token position t predicts (already shifted), or IGNORE_INDEX
    position_ids: torch.Tensor | None = None
    sources: torch.Tensor | None = None  # source index of each window (a mixture's)

    def model_inputs(self, device: torch.device | str | None = None) -> dict:
        """Keyword arguments of LlamaForCausalLM (on `device`, each tensor moved once).

        The targets go in once, as `shift_labels`: used as given (never shifted by one) by transformers'
        causal-LM loss (`ForCausalLMLoss`) and by Liger's forward, whose fused linear cross-entropy computes
        the loss from them alone. No `labels`: transformers would shift those. `causal_lm_loss` gives the
        loss of the output: the mean over every position with a target, seq_len per concat window."""
        def move(t):
            return t if device is None else t.to(device, non_blocking=True)

        d = {"input_ids": move(self.input_ids), "shift_labels": move(self.targets)}
        if self.position_ids is not None:
            d["position_ids"] = move(self.position_ids)
        return d


def causal_lm_loss(model, out, shift_labels: torch.Tensor) -> torch.Tensor:
    """The loss of a forward of `model` (a LlamaForCausalLM, or the DeepSpeed engine around one) given
    `Batch.model_inputs`: its own where the forward computed one from shift_labels (Liger's), else the model's
    `loss_function` (transformers' ForCausalLMLoss) over the logits and shift_labels as given: transformers'
    LlamaForCausalLM.forward computes a loss only when `labels` is passed."""
    if out.loss is not None:
        return out.loss
    module = getattr(model, "module", model)  # the engine's model
    return module.loss_function(logits=out.logits, labels=None, shift_labels=shift_labels, vocab_size=module.config.vocab_size)
