"""launch/pretrain.py with one deliberate defect, for showing that the convergence test guards the chain.

    python tests/convergence/broken_pretrain.py BREAK [pretrain.py arguments]   (also under torchrun)

BREAK:
  labels     targets shifted by one more position (position t trained to predict token t + 2)
  positions  position ids that do not restart per packed sentence (0 .. L-1 across the whole window)
  leak       position ids restart, but packed sentences attend to each other (one causal mask over the window)
  repeat     a loader that returns its first micro-batch at every step
"""

import runpy
import sys
from pathlib import Path

import torch

from lvm.data import mixture
from lvm.data.windows import batch
from lvm.model.vocab import IGNORE_INDEX
from lvm.train import trainer

BREAKS = ("labels", "positions", "leak", "repeat")


def shift_labels_once_more():
    original = batch.Batch.model_inputs

    def model_inputs(self, device=None):
        d = original(self, device)
        t = d["shift_labels"]
        shifted = torch.full_like(t, IGNORE_INDEX)
        shifted[:, :-1] = t[:, 1:]
        d["shift_labels"] = shifted
        return d

    batch.Batch.model_inputs = model_inputs


def positions_never_restart():
    original = batch.Batch.model_inputs

    def model_inputs(self, device=None):
        d = original(self, device)
        if "position_ids" in d:
            p = d["position_ids"]
            d["position_ids"] = torch.arange(p.shape[1], device=p.device).expand_as(p).contiguous()
        return d

    batch.Batch.model_inputs = model_inputs


def sentences_attend_to_each_other():
    def packed_attention_kwargs(position_ids, attn, dtype):
        if position_ids is None:
            return {}
        b, n = position_ids.shape
        causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
        mask = torch.zeros(b, 1, n, n, dtype=dtype).masked_fill(~causal, torch.finfo(dtype).min)
        return {"attention_mask": mask}

    trainer.packed_attention_kwargs = packed_attention_kwargs


def loader_repeats_its_first_batch():
    original = mixture.DistributedLoader.next_batch

    def next_batch(self):
        if not hasattr(self, "_first"):
            self._first = original(self)
        return self._first

    mixture.DistributedLoader.next_batch = next_batch


if __name__ == "__main__":
    which = sys.argv[1]
    if which not in BREAKS:
        sys.exit(f"usage: broken_pretrain.py {{{','.join(BREAKS)}}} [pretrain.py arguments]")
    {"labels": shift_labels_once_more, "positions": positions_never_restart, "leak": sentences_attend_to_each_other,
     "repeat": loader_repeats_its_first_batch}[which]()
    script = Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"
    sys.argv = [str(script), *sys.argv[2:]]
    runpy.run_path(str(script), run_name="__main__")
