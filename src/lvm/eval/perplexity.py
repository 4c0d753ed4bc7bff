"""Perplexity of visual sentences: overall, per data kind, vs number of context frames, and vs
number of in-context example pairs.

Every sentence is scored alone as `[BOS] tokens [EOS]`, over target tokens only (everything after BOS).
A model with a window of W positions predicts W targets: the input is the first W tokens of the
sentence and the targets are the tokens after each, so the first W + 1 tokens take part. A 16-frame
video is 1 + 16 x 256 + 1 = 4098 tokens: with the paper's W = 4096 its 4096 inputs (BOS and 4095 image
tokens) predict all 4096 image tokens, the 16th frame's last one from position 4095, and only EOS falls
outside. So the context-frames curve reaches 15 frames, as in LVM's figure (1 -> 15), with no position
past the window and nothing dropped from the prompt (cutting BOS instead would condition on a sentence
start the model never saw without it). Scoring W - 1 targets, as a window cut to W tokens would, stops
the curve at 14. One forward pass per batch of sentences of similar length.

From the same per-token losses:
- context frames: for `video` and `sequence` sentences, image j (0-based) is scored given the j
  images before it; k = j is its number of context frames (the paper's figure: 1 -> 15 frames);
- context pairs: for `pairs` sentences x1, y1, ..., xn, yn, annotation y_j is scored given the
  j-1 complete example pairs before it (and its own x_j).
Only images whose every token is a target count. Results are sums of NLL and token counts, so ranks
can score disjoint slices and add them up.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from lvm.data.shards.format import KINDS
from lvm.data.shards.shard_set import ShardSet
from lvm.model.vocab import IGNORE_INDEX, PAD_ID, TOKENS_PER_IMAGE, frame

SEQUENTIAL_KINDS = ("video", "sequence")


class Sums:
    """NLL sums and counts keyed by name."""

    def __init__(self):
        self.nll: dict[str, float] = defaultdict(float)
        self.n: dict[str, float] = defaultdict(float)

    def add(self, key: str, nll: float, n: int) -> None:
        self.nll[key] += nll
        self.n[key] += n

    def reduce(self) -> None:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (dict(self.nll), dict(self.n)))
        self.nll, self.n = defaultdict(float), defaultdict(float)
        for nll, n in gathered:
            for k in nll:
                self.add(k, nll[k], n[k])

    def ppl(self, key: str) -> float:
        return math.exp(self.nll[key] / self.n[key])


def sentence_ids(table: ShardSet, i: int, window: int) -> np.ndarray:
    """The first window + 1 tokens of `[BOS] tokens [EOS]`: `window` inputs and the target after each."""
    return frame(table.sentence(i), end=window + 1)


@torch.no_grad()
def token_losses(model, seqs: list[np.ndarray], device) -> list[np.ndarray]:
    """Per-token NLL of tokens 1..n-1 of each sequence, from inputs 0..n-2 (right-padded batch, causal:
    no mask needed, a row's padding comes after all its targets)."""
    n = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), n), PAD_ID, dtype=torch.long)
    targets = torch.full((len(seqs), n), IGNORE_INDEX, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s) - 1] = torch.from_numpy(s[:-1])
        targets[r, : len(s) - 1] = torch.from_numpy(s[1:])
    logits = model(input_ids=ids.to(device), use_cache=False).logits.float()
    nll = F.cross_entropy(logits.transpose(1, 2), targets.to(device), ignore_index=IGNORE_INDEX, reduction="none")
    nll = nll.cpu().numpy()
    return [nll[r, : len(s) - 1] for r, s in enumerate(seqs)]


def score(model, table: ShardSet, window: int, batch_size: int = 4, rank: int = 0, world: int = 1,
          max_sentences: int | None = None, progress: bool = True) -> Sums:
    """Sums over sentences 0..max_sentences-1 of `table` (this rank: every world-th one)."""
    device = next(model.parameters()).device
    n = len(table) if max_sentences is None else min(max_sentences, len(table))
    lengths, kinds, n_images = table.lengths(n), table.kind_codes(n), table.image_counts(n)
    mine = np.arange(rank, n, world)
    mine = mine[np.argsort(-lengths[mine], kind="stable")].tolist()  # similar lengths batch together
    sums = Sums()
    bar = tqdm(total=len(mine), unit="sent", desc="eval", disable=not progress or rank != 0)
    # every rank runs the same number of forward passes: ZeRO-3 gathers weights collectively
    n_batches = math.ceil(math.ceil(n / world) / batch_size) if n else 0
    for b in range(0, n_batches * batch_size, batch_size):
        idx = mine[b : b + batch_size]
        if not idx:
            token_losses(model, [frame(np.zeros(0, np.int64))], device)
            continue
        seqs = [sentence_ids(table, i, window) for i in idx]
        for i, s, nll in zip(idx, seqs, token_losses(model, seqs, device), strict=True):
            kind = KINDS[kinds[i]]
            sums.add("all", float(nll.sum()), len(nll))
            sums.add(f"kind/{kind}", float(nll.sum()), len(nll))
            # nll[t] scores token t+1 of the sequence; image j occupies tokens 1 + 256 j ... 256 (j+1),
            # all of them targets when 256 (j+1) <= len(s) - 1 (at most the window)
            n_full = min(int(n_images[i]), (len(s) - 1) // TOKENS_PER_IMAGE)
            for j in range(n_full):
                part = nll[j * TOKENS_PER_IMAGE : (j + 1) * TOKENS_PER_IMAGE]
                if kind in SEQUENTIAL_KINDS:
                    sums.add(f"frames/{j}", float(part.sum()), len(part))
                elif kind == "pairs" and j % 2 == 1:
                    sums.add(f"pairs/{j // 2}", float(part.sum()), len(part))
        bar.update(len(idx))
    bar.close()
    sums.reduce()
    return sums


def unigram_entropy(table: ShardSet, max_sentences: int | None = None) -> float:
    """Entropy (nats) of the visual codes of `table`'s sentences: the loss of the best model that ignores context,
    which a model that learns anything of the sequences must go well below."""
    n = len(table) if max_sentences is None else min(max_sentences, len(table))
    counts = np.zeros(1 << 16, np.int64)
    pending: list[np.ndarray] = []
    held = 0
    for i in range(n):  # one bincount per ~1M tokens, not one 64k-bin pass per sentence
        pending.append(table.sentence(i))
        held += len(pending[-1])
        if held >= 1 << 20 or i == n - 1:
            counts += np.bincount(np.concatenate(pending), minlength=1 << 16)
            pending, held = [], 0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def results(sums: Sums) -> dict:
    def keyed(prefix):
        ks = sorted(int(k.split("/")[1]) for k in sums.n if k.startswith(prefix + "/"))
        return {str(k): sums.ppl(f"{prefix}/{k}") for k in ks}

    return {
        "perplexity": sums.ppl("all") if sums.n["all"] else float("nan"),
        "perplexity_by_kind": {k.split("/", 1)[1]: sums.ppl(k) for k in sorted(sums.n) if k.startswith("kind/")},
        "perplexity_by_context_frames": keyed("frames"),
        "perplexity_by_context_pairs": keyed("pairs"),
        "tokens": int(sums.n["all"]),
    }


def plot(res: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label in (("perplexity_by_context_frames", "next frame (video, sequence)"),
                       ("perplexity_by_context_pairs", "annotation (in-context pairs)")):
        d = res[key]
        if d:
            ax.plot([int(k) for k in d], list(d.values()), marker="o", label=label)
    ax.set_xlabel("context images (frames / example pairs)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity vs context")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
