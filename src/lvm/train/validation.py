"""Validation during training: loss and perplexity, overall, per data kind and per source, over whole sentences.

The evaluator of `lvm.eval.perplexity` does the work (each sentence scored alone as
`[BOS] tokens [EOS]`, ranks score disjoint slices and their sums are added up), so the numbers
logged during training are the ones `launch/evaluate.py` reports for the same checkpoint.
Each source of a mixture is scored on its own validation shards (`val/` beside it); the overall
numbers pool the tokens of all of them.
"""

from __future__ import annotations

import math

import torch

from lvm.data.shards import ShardSet
from lvm.eval.perplexity import Sums, score


@torch.no_grad()
def evaluate(model, sets: list[tuple[str, ShardSet]] | ShardSet, seq_len: int, batch_size: int, rank: int = 0,
             world: int = 1, max_sentences: int | None = None) -> dict:
    """{loss, perplexity, tokens, perplexity_by_kind, loss_by_source}; max_sentences caps each source."""
    if isinstance(sets, ShardSet):
        sets = [("data", sets)]
    was_training = model.training
    model.eval()
    total, by_source = Sums(), {}
    for name, table in sets:
        s = score(model, table, seq_len, batch_size, rank, world, max_sentences, progress=False)
        by_source[name] = s.nll["all"] / max(s.n["all"], 1)
        for k in list(s.n):
            total.add(k, s.nll[k], s.n[k])
    if was_training:
        model.train()
    loss = total.nll["all"] / max(total.n["all"], 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(total.n["all"]),
            "perplexity_by_kind": {k.split("/", 1)[1]: total.ppl(k) for k in sorted(total.n) if k.startswith("kind/")},
            "loss_by_source": by_source}
