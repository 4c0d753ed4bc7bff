"""What each kind of input yields, in order: items to encode, or a `Skip` naming what could not be used.

- `manifest.py`    JSONL manifests: per line its `Sentence` chunks (with the line's fields), or a Skip;
- `webdataset.py`  webdataset tars: per sample a `Sample` (image bytes, json, txt), or a Skip;
- `lvm_jsonl.py`   LVM's token files: per line a ready row of codes, or a Skip (and the way back: export).

A source never raises for a bad input: a missing file, a malformed line or a broken member is a Skip, and the
run reports every Skip with its path and reason (`report.json`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Skip:
    source: str
    reason: str
    sentence: str | None = None
    line: int | None = None
    key: str | None = None      # a webdataset sample's key within its tar

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


__all__ = ["Skip"]
