"""Validation loss and perplexity, overall and per data kind, over whole sentences.

Each sentence is scored alone as `[BOS] tokens [EOS]` (cut to the window), so perplexities are
comparable across kinds and packing modes. Ranks score disjoint slices and the sums are reduced;
every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lvm.data.shards import SentenceTable
from lvm.model.vocab import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID


def sentence_batch(table: SentenceTable, idx: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [np.concatenate([[BOS_ID], table.sentence(i).astype(np.int64), [EOS_ID]])[:seq_len] for i in idx]
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD_ID, dtype=torch.long)
    labels = torch.full((len(seqs), n), IGNORE_INDEX, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.from_numpy(s)
        labels[r, : len(s)] = torch.from_numpy(s)
    return ids, labels


def token_nll(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (sum of NLL, count) over target tokens; right padding needs no mask (causal)."""
    logits = model(input_ids=ids).logits.float()
    tgt = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, ignore_index=IGNORE_INDEX, reduction="none")
    mask = tgt != IGNORE_INDEX
    return (nll * mask).sum(1), mask.sum(1)


@torch.no_grad()
def evaluate(model, table: SentenceTable, seq_len: int, batch_size: int, device, rank: int = 0, world: int = 1,
             max_sentences: int | None = None) -> dict:
    kinds = sorted(set(table.kinds.tolist()))
    n = len(table) if max_sentences is None else min(len(table), max_sentences)
    mine = list(range(rank, n, world))
    n_batches = math.ceil(math.ceil(n / world) / batch_size) if n else 0
    sums = torch.zeros(len(kinds), 2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for b in range(n_batches):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        ids, labels = sentence_batch(table, idx or [0], seq_len)
        if not idx:
            labels.fill_(IGNORE_INDEX)  # keeps collective forward passes in step
        s, c = token_nll(model, ids.to(device), labels.to(device))
        for r, i in enumerate(idx):
            k = kinds.index(table.kinds[i])
            sums[k, 0] += float(s[r])
            sums[k, 1] += float(c[r])
    if was_training:
        model.train()
    if world > 1 and dist.is_initialized():
        t = sums.to(device)
        dist.all_reduce(t)
        sums = t.cpu()
    total_nll, total_n = float(sums[:, 0].sum()), float(sums[:, 1].sum())
    out = {"loss": total_nll / max(total_n, 1), "tokens": int(total_n)}
    out["perplexity"] = math.exp(out["loss"])
    out["perplexity_by_kind"] = {k: math.exp(float(sums[j, 0] / sums[j, 1])) for j, k in enumerate(kinds) if sums[j, 1] > 0}
    return out
