"""The settings of an offline run (`make_shards.py` flags; every default defined here once)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lvm.data.offline.sources.manifest import DEFAULT_MAX_IMAGES
from lvm.data.offline.units import DEFAULT_PART_BYTES
from lvm.data.shards.format import KINDS
from lvm.tokenizer import parse_spec
from lvm.tokenizer.preprocess import RESIZE_MODES

# what the output bytes depend on: a rerun into OUT with other values of these stops (`writer.check_settings`)
OUTPUT_SETTINGS = ("tokenizer", "val_fraction", "sentences_per_shard", "max_images", "resize", "seed", "fit_images",
                   "part_bytes", "import_kind")


@dataclass
class BuildConfig:
    inputs: list[str] = field(default_factory=list)
    out: str = "data/shards"
    tokenizer: str = "patch-kmeans"
    workers: int = 2
    batch_size: int = 64
    val_fraction: float = 0.05
    sentences_per_shard: int = 8192
    max_images: int = DEFAULT_MAX_IMAGES
    resize: str = "squash"
    seed: int = 0
    fit_images: int = 2048
    part_bytes: int = DEFAULT_PART_BYTES
    rank: int = 0
    world_size: int = 1
    index_only: bool = False
    fit_only: bool = False
    device: str | None = None
    progress: bool = True
    import_kind: str | None = None       # LVM token files: the kind of their sentences
    tokenizer_info: dict | None = None   # LVM token files: what made the tokens

    def check(self) -> None:
        if not self.inputs:
            raise ValueError("give at least one --input")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 0 or self.batch_size < 1 or self.sentences_per_shard < 1:
            raise ValueError("--workers must be >= 0, --batch-size and --sentences-per-shard >= 1")
        if self.max_images < 2:
            raise ValueError("--max-images must be at least 2")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"--resize must be one of {RESIZE_MODES}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.import_kind is not None and self.import_kind not in KINDS:
            raise ValueError(f"--kind must be one of {list(KINDS)}, got {self.import_kind!r}")
        if self.import_kind is None:
            parse_spec(self.tokenizer)

    def settings(self) -> dict:
        """The values the output bytes depend on (recorded in OUT/.parts/settings.json)."""
        return {k: getattr(self, k) for k in OUTPUT_SETTINGS}


__all__ = ["BuildConfig", "OUTPUT_SETTINGS"]
