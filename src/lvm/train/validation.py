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

from lvm.data.shards.shard_set import ShardSet
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


class Validator:
    """Validation during training, every --eval-every steps and at the end: one metrics row and one console line;
    nothing where the run has no validation data or --eval-every is 0."""

    def __init__(self, val_sets: list[tuple[str, ShardSet]], opts, rank: int, world: int, log):
        self.val_sets, self.opts, self.rank, self.world, self.log = val_sets, opts, rank, world, log

    def due(self, step: int) -> bool:
        return bool(self.opts.eval_every) and step % self.opts.eval_every == 0 and step < self.opts.max_steps

    def __call__(self, model, step: int) -> None:
        if not self.val_sets or self.opts.eval_every == 0:
            return
        o = self.opts
        r = evaluate(model, self.val_sets, o.seq_len, o.micro_batch, self.rank, self.world, o.eval_max_sentences)
        flat = {"loss": r["loss"], "perplexity": r["perplexity"], **{f"perplexity/{k}": v for k, v in r["perplexity_by_kind"].items()},
                **{f"loss/{k}": v for k, v in r["loss_by_source"].items()}}
        self.log.log(step, flat, prefix="val")
        kinds = " ".join(f"{k} {v:.1f}" for k, v in r["perplexity_by_kind"].items())
        per_source = " | " + " ".join(f"{k} {v:.4f}" for k, v in r["loss_by_source"].items()) if len(self.val_sets) > 1 else ""
        self.log.console(f"step {step} val loss {r['loss']:.4f} ppl {r['perplexity']:.2f} | {kinds}{per_source}")
