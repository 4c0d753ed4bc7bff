"""The first pass of a token store: every distinct image gets the one unit that encodes it and its global number.

The records of every unit are read in input order (manifest lines only: no image is opened). An image key is
given to the first unit whose records use it and numbered in the order of first use, so the numbers depend on the
inputs alone: every rank computes the same plan, encodes only the images of its own units, and writes its records
with the global numbers of images that other units (of any rank) encode. A unit's plan digest (its images, its
records' image numbers and its first image number) goes into its part mark: a finished unit whose plan changed
(an earlier input changed) is redone.

Memory: one dict entry per distinct image of the store (the key and its number); the records, keys and skips are
kept only for the units this process builds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from lvm.data.offline.sources import Skip
from lvm.data.offline.units import Unit
from lvm.data.store_records import Record, unit_records


@dataclass
class UnitPlan:
    image_first: int                                # global number of the unit's first image
    images: int = 0                                 # images the unit encodes
    digest: str = ""
    keys: list[str] = field(default_factory=list)   # the images it encodes, in row order (kept units only)
    records: list[Record] = field(default_factory=list)
    refs: list[tuple[int, int]] = field(default_factory=list)  # per record: global first, second (-1: none)
    skipped: list[Skip] = field(default_factory=list)


class Planner:
    """Numbers image keys across units in the order they are added."""

    def __init__(self):
        self.number: dict[str, int] = {}

    def add(self, items, keep: bool) -> UnitPlan:
        """A unit's records (and Skips, passed through) -> its plan; `keep`: hold its keys, records and skips."""
        plan = UnitPlan(image_first=len(self.number))
        h = hashlib.blake2b(f"{plan.image_first}\n".encode(), digest_size=16)
        for item in items:
            if isinstance(item, Skip):
                if keep:
                    plan.skipped.append(item)
                continue
            refs = []
            for k in item.keys:
                g = self.number.get(k)
                if g is None:
                    g = self.number[k] = len(self.number)
                    h.update(f"+{k}\n".encode())
                    if keep:
                        plan.keys.append(k)
                refs.append(g)
            first, second = refs[0], refs[1] if len(refs) > 1 else -1
            h.update(f"{first} {second}\n".encode())
            if keep:
                plan.records.append(item)
                plan.refs.append((first, second))
        plan.images = len(self.number) - plan.image_first
        plan.digest = h.hexdigest()
        return plan


def plan_store(units: list[Unit], keep: set[str]) -> list[UnitPlan]:
    """The plan of every unit (in order); the units named in `keep` with their keys, records and skips."""
    planner = Planner()
    return [planner.add(unit_records(u), u.name in keep) for u in units]


def plan_records(units_records: list[list[Record]]) -> list[UnitPlan]:
    """The plan of units given as lists of records (all kept): what a writer of a store needs without manifests."""
    planner = Planner()
    return [planner.add(rs, True) for rs in units_records]


def refs_array(plan: UnitPlan) -> np.ndarray:
    """int64 [records, 2]: each record's first and second global image number."""
    return np.asarray(plan.refs, np.int64).reshape(-1, 2)


__all__ = ["UnitPlan", "Planner", "plan_store", "plan_records", "refs_array"]
