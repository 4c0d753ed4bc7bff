"""Validation during training: loss and perplexity, overall and per data kind, over whole sentences.

The evaluator of `lvm.eval.perplexity` does the work (each sentence scored alone as
`[BOS] tokens [EOS]`, ranks score disjoint slices and their sums are added up), so the numbers
logged during training are the ones `launch/evaluate.py` reports for the same checkpoint.
"""

from __future__ import annotations

import math

import torch

from lvm.data.shards import SentenceTable
from lvm.eval.perplexity import score


@torch.no_grad()
def evaluate(model, table: SentenceTable, seq_len: int, batch_size: int, rank: int = 0, world: int = 1,
             max_sentences: int | None = None) -> dict:
    was_training = model.training
    model.eval()
    sums = score(model, table, seq_len, batch_size, rank, world, max_sentences, progress=False)
    if was_training:
        model.train()
    loss = sums.nll["all"] / max(sums.n["all"], 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(sums.n["all"]),
            "perplexity_by_kind": {k.split("/", 1)[1]: sums.ppl(k) for k in sorted(sums.n) if k.startswith("kind/")}}
