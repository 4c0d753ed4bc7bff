"""Visual sentences composed from a token store (`lvm.data.store`), never re-encoding an image.

LVM tokenized every image or (input, label) pair once and drew its in-context sentences from those tokens, with a
fresh grouping every epoch. `compose` does the same and writes ordinary shards (`OUT/train`, `OUT/val`,
`tokenizer.json`, `index.json`, through make_shards' own writer) that training and evaluation read unchanged:

- pairs (`--pairs TASK`): the task's (input, label) pairs; every epoch a fresh permutation cut into sentences of
  `shots` pairs `x1, y1, x2, y2, ...` (kind `pairs`: a pair stays adjacent and in that order).
- categories (`--categories [NAME ...]`): single images with a category; every epoch each category's images in a
  fresh order are cut into shots of `images_per_shot` (the remainder waits for another epoch), and the shots of all
  categories, permuted, make sentences of `shots` shots `c1, c1, c2, c2, ...` (kind `sequence`).
- multi (`--multi TASK TASK ...`): LVM's mixtures of datasets in one sentence: the inputs that every named task has
  a pair for form groups `x, y_task1, y_task2, ...`; sentences of `shots` groups (kind `sequence`); with
  `shuffle_tasks` (LVM's default) the order of the labels is permuted per sentence, the same for all its groups,
  the input staying first.

Validation holds out whole items (a pair, an image, an input with its labels) by a hash of the record id (the
input's key for multi), as make_shards splits sentences; validation sentences are composed once (epoch 0's
grouping, their own seed), training sentences for every epoch. A sentence has at most 16 images (4096 tokens).

Deterministic: the grouping of epoch e depends only on the store, the settings and (seed, e). Units of work are
blocks of `sentences_per_shard` sentences of one epoch (one shard each); rank r of W takes blocks r, r+W, ...;
a block writes its shard and then `.parts/<block>.json`; a rerun skips finished blocks; the index is written once
every block is finished (by rank 0, or `index_only`). Output bytes depend on neither the ranks nor a kill.
Each rank holds the tokens of the images the selected items use in memory (512 bytes per image: 1M pairs, 1 GiB).
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lvm.artifacts import TokenizerRecord
from lvm.data.offline.sources.manifest import DEFAULT_MAX_IMAGES
from lvm.data.offline.units import Unit, mine
from lvm.data.offline.writer import (
    UnitOutput,
    clear_unit,
    finished_part,
    is_val,
    open_output,
    write_index,
    write_part,
)
from lvm.data.shards.format import SPLITS, atomic_write_text
from lvm.data.store import PALETTES, Store, StoreError, open_store
from lvm.model.vocab import TOKENS_PER_IMAGE

MODES = ("pairs", "categories", "multi")
COMPOSE_FORMAT = "lvm-compose/1"


@dataclass
class ComposeConfig:
    store: str = ""
    out: str = ""
    mode: str = "pairs"
    names: list[str] = field(default_factory=list)  # pairs: [TASK]; multi: tasks; categories: categories ([] = all)
    shots: int = 8
    images_per_shot: int = 2
    epochs: int = 1
    seed: int = 0
    val_fraction: float = 0.05
    sentences_per_shard: int = 8192
    shuffle_tasks: bool = True
    max_images: int = DEFAULT_MAX_IMAGES
    rank: int = 0
    world_size: int = 1
    index_only: bool = False
    progress: bool = True

    @property
    def images_per_item(self) -> int:
        return {"pairs": 2, "categories": self.images_per_shot, "multi": 1 + len(self.names)}[self.mode]

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.mode == "pairs" and len(self.names) != 1:
            raise ValueError("--pairs takes one task")
        if self.mode == "multi" and (len(self.names) < 2 or len(set(self.names)) != len(self.names)):
            raise ValueError("--multi takes two or more different tasks")
        for k in ("shots", "images_per_shot", "epochs", "sentences_per_shard"):
            if getattr(self, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        if self.shots * self.images_per_item > self.max_images:
            raise ValueError(f"{self.shots} shots of {self.images_per_item} images make {self.shots * self.images_per_item} "
                             f"images per sentence, more than {self.max_images} ({self.max_images * TOKENS_PER_IMAGE} "
                             "tokens): lower --shots")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

    @property
    def label(self) -> str:
        return f"{self.mode}:{'+'.join(self.names)}" if self.names else self.mode

    def settings(self) -> dict:
        keys = ("mode", "names", "shots", "images_per_shot", "epochs", "seed", "val_fraction", "sentences_per_shard",
                "shuffle_tasks", "max_images")
        return {k: getattr(self, k) for k in keys}


# ----------------------------------------------------------------------------------------------
# What a sentence is made of


@dataclass
class Items:
    """The items of one split: image indices [n, images per item] (global, into the store) and, for categories,
    each item's category code."""

    images: np.ndarray
    category: np.ndarray | None = None


def select_items(store: Store, cfg: ComposeConfig) -> dict[str, Items]:
    """The items of each split (train, val) in store order; StoreError when the store has none."""
    if cfg.mode == "pairs":
        (task,) = cfg.names
        sel = np.flatnonzero((store.kinds == "pair") & (store.groups == task))
        if not len(sel):
            raise StoreError(f"store {store.root} has no pairs of task {task!r} (its tasks: {sorted(store.index['tasks'])})")
        images = np.stack([store.first[sel], store.second[sel]], 1)
        item_ids = [store.ids[i] for i in sel]
        category = None
    elif cfg.mode == "categories":
        cats = store.index["categories"]
        wanted = cfg.names or sorted(c for c in cats if c)
        missing = [c for c in wanted if c not in cats or not c]
        if missing or not wanted:
            raise StoreError(f"store {store.root} has no images of category {missing[0] if missing else '(any)'!r} "
                             f"(its categories: {sorted(c for c in cats if c)[:20]})")
        code = {c: j for j, c in enumerate(wanted)}
        sel = np.flatnonzero((store.kinds == "image") & np.isin(store.groups, wanted))
        images = store.first[sel][:, None]
        item_ids = [store.ids[i] for i in sel]
        category = np.array([code[g] for g in store.groups[sel]], np.int64)
    else:
        keys = np.array(store.keys(), dtype=object)
        per_task = []
        for task in cfg.names:
            sel = np.flatnonzero((store.kinds == "pair") & (store.groups == task))
            if not len(sel):
                raise StoreError(f"store {store.root} has no pairs of task {task!r} (its tasks: {sorted(store.index['tasks'])})")
            label_of: dict = {}
            for x, y in zip(keys[store.first[sel]], store.second[sel], strict=True):
                label_of.setdefault(x, y)
            per_task.append((sel, label_of))
        first_sel, _ = per_task[0]
        rows, item_ids, seen = [], [], set()
        for x_index in store.first[first_sel]:
            x = keys[x_index]
            if x in seen or not all(x in lab for _, lab in per_task):
                continue
            seen.add(x)
            rows.append([x_index, *(lab[x] for _, lab in per_task)])
            item_ids.append(x)
        if not rows:
            raise StoreError(f"store {store.root}: no input image has a pair in every one of the tasks {cfg.names}")
        images = np.array(rows, np.int64)
        category = None
    val = np.array([is_val(i, cfg.val_fraction) for i in item_ids], bool)
    return {split: Items(images[mask], None if category is None else category[mask])
            for split, mask in (("train", ~val), ("val", val))}


def _rng(cfg: ComposeConfig, split: str, epoch: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, SPLITS.index(split), epoch])


def sentence_count(items: Items, cfg: ComposeConfig) -> int:
    """Sentences of one epoch (the same for every epoch)."""
    if cfg.mode == "categories":
        shots = int(sum(c // cfg.images_per_shot for c in np.bincount(items.category))) if len(items.category) else 0
    else:
        shots = len(items.images)
    return -(-shots // cfg.shots)


def epoch_plan(items: Items, cfg: ComposeConfig, split: str, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The sentences of one epoch: (image indices of all of them in order, int64 offsets [sentences + 1] into it)."""
    rng = _rng(cfg, split, epoch)
    if cfg.mode == "categories":
        ipc = cfg.images_per_shot
        order = np.lexsort((rng.random(len(items.category)), items.category))  # each category in a fresh order
        cats = items.category[order]
        start = np.searchsorted(cats, cats, side="left")
        rank_in_cat = np.arange(len(cats)) - start
        counts = np.bincount(cats)
        keep = rank_in_cat < (counts[cats] // ipc) * ipc
        shots = items.images[order[keep], 0].reshape(-1, ipc)
        shots = shots[rng.permutation(len(shots))]
    else:
        shots = items.images[rng.permutation(len(items.images))]
        if cfg.mode == "multi" and cfg.shuffle_tasks:
            n_sent = -(-len(shots) // cfg.shots)
            label_order = np.argsort(rng.random((n_sent, shots.shape[1] - 1)), axis=1) + 1
            per_shot = np.repeat(label_order, cfg.shots, axis=0)[: len(shots)]
            shots = np.concatenate([shots[:, :1], np.take_along_axis(shots, per_shot, axis=1)], axis=1)
    flat = shots.reshape(-1)
    per_sentence = cfg.shots * shots.shape[1]
    offsets = np.minimum(np.arange(0, len(flat) + per_sentence, per_sentence), len(flat))
    offsets = np.unique(offsets) if len(flat) else np.zeros(1, np.int64)
    return flat, offsets.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Units of work: blocks of sentences


def plan_blocks(counts: dict[str, int], cfg: ComposeConfig) -> list[tuple[Unit, str, int]]:
    """(unit, split, epoch) of every block, in order: train epochs, then validation (one grouping)."""
    blocks = []
    S = cfg.sentences_per_shard
    for split, epochs in (("train", cfg.epochs), ("val", 1)):
        n = counts[split]
        for e in range(epochs):
            for b in range(-(-n // S)):
                name = f"e{e:03d}-{b:05d}" if split == "train" else f"val-{b:05d}"
                blocks.append((Unit(name, "compose", cfg.store, b * S, min(n, (b + 1) * S), n), split, e))
    return blocks


class Composer:
    """The items of each split and their tokens (only the images they use, gathered from the store once)."""

    def __init__(self, store: Store, cfg: ComposeConfig):
        self.cfg = cfg
        self.items = select_items(store, cfg)
        used = np.unique(np.concatenate([it.images.reshape(-1) for it in self.items.values()]))
        self.tokens = store.gather(used)
        for it in self.items.values():  # global image index -> row of self.tokens
            it.images = np.searchsorted(used, it.images)

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one Composer per run)
    def plan(self, split: str, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return epoch_plan(self.items[split], self.cfg, split, epoch)

    def rows(self, split: str, epoch: int, start: int, stop: int) -> list[dict]:
        flat, offsets = self.plan(split, epoch)
        lo, hi = int(offsets[start]), int(offsets[stop])
        toks = self.tokens[flat[lo:hi]]
        kind = "pairs" if self.cfg.mode == "pairs" else "sequence"
        prefix = f"{self.cfg.label}/{'val' if split == 'val' else f'e{epoch}'}/"
        return [{"tokens": toks[offsets[i] - lo : offsets[i + 1] - lo].reshape(-1), "n_images": int(offsets[i + 1] - offsets[i]),
                 "kind": kind, "id": f"{prefix}{i}"} for i in range(start, stop)]


def compose_block(out: Path, composer: Composer, unit: Unit, split: str, epoch: int) -> dict:
    """Write one block's shard (make_shards' writer) and then its part report."""
    clear_unit(out, unit.name)
    output = UnitOutput(out, unit.name, composer.cfg.sentences_per_shard)
    for row in composer.rows(split, epoch, unit.start, unit.stop):
        output.add(split, row)
    output.close()
    return write_part(out, unit, output.shards, [])


def compose(cfg: ComposeConfig, overwrite: bool = False) -> dict:
    """Compose sentences from cfg.store into cfg.out; returns a summary. Raises ValueError/StoreError (one line)."""
    cfg.check()
    t0 = time.perf_counter()
    store = open_store(cfg.store)
    out = Path(cfg.out)
    if out.resolve() == Path(cfg.store).resolve():
        raise ValueError("--out must be another folder than --store")
    open_output(out, {"format": COMPOSE_FORMAT, "store": store.digest(), **cfg.settings()},
                clear=overwrite and cfg.rank == 0, what="sentences")
    composer = Composer(store, cfg)
    counts = {s: sentence_count(it, cfg) for s, it in composer.items.items()}
    if counts["train"] == 0:
        raise StoreError(f"store {store.root}: too few items for one training sentence of {cfg.label}")
    blocks = plan_blocks(counts, cfg)
    todo = [] if cfg.index_only else [b for b in mine(blocks, cfg.rank, cfg.world_size) if finished_part(out, b[0]) is None]
    written = 0
    with tqdm(total=sum(b[0].stop - b[0].start for b in todo), unit="sentence", desc=f"compose[{cfg.rank}/{cfg.world_size}]",
              file=sys.stderr, dynamic_ncols=True, disable=not cfg.progress or not todo) as bar:
        for unit, split, epoch in todo:
            compose_block(out, composer, unit, split, epoch)
            written += unit.stop - unit.start
            bar.update(unit.stop - unit.start)
    seconds = time.perf_counter() - t0
    report = None
    if cfg.rank == 0 or cfg.index_only:
        tok_info = TokenizerRecord.from_shards(store.root).to_info(relative_to=out)
        report = write_index(out, [b[0] for b in blocks], tok_info)
        if report is not None:
            if (store.root / PALETTES).is_dir():
                shutil.copytree(store.root / PALETTES, out / PALETTES, dirs_exist_ok=True)
            info = {"format": COMPOSE_FORMAT, "store": str(store.root.resolve()), "store_digest": store.digest(),
                    **cfg.settings(), "items": {s: len(it.images) for s, it in composer.items.items()},
                    "sentences_per_epoch": counts}
            atomic_write_text(out / "compose.json", json.dumps(info, indent=2))
    return {"out": str(out), "report": report, "written": written, "seconds": seconds, "counts": counts,
            "items": {s: len(it.images) for s, it in composer.items.items()}, "label": cfg.label, "blocks": len(blocks)}


def compose_summary(s: dict) -> str:
    rate = s["written"] / s["seconds"] * 60 if s["seconds"] > 0 else 0.0
    head = (f"{s['label']}: {s['items']['train']} train / {s['items']['val']} val items, {s['counts']['train']} train "
            f"sentences per epoch, {s['counts']['val']} val; this run wrote {s['written']} sentences in {s['seconds']:.1f}s "
            f"({rate:,.0f}/min)")
    if s["report"] is None:
        return head + "; run the index step (--index-only) once all ranks finish"
    return head + f"; index written in {s['out']}"


__all__ = ["ComposeConfig", "MODES", "compose", "compose_summary", "select_items", "epoch_plan", "sentence_count"]
