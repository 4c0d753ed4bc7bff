"""Re-exports only: the offline stage is the package `lvm.data.offline` (see its `pipeline.py`).

Why this file is still here: `lvm.data.store`, `lvm.data.compose` and their tests were written against this path while the
package was made; they import these names from here until they import them from `lvm.data.offline`. Then this
file goes. No logic lives here.
"""

from lvm.data.offline.config import BuildConfig
from lvm.data.offline.decode import ordered_map
from lvm.data.offline.decode import task_batches as _task_batches
from lvm.data.offline.encode import Encoder, encode_device
from lvm.data.offline.fit import resolve_tokenizer, tokenizer_info
from lvm.data.offline.writer import (
           PARTS,
           UnitOutput,
           finished_part,
           is_val,
           part_path,
           remove_temp_files,
           write_index,
)
from lvm.data.offline.writer import unit_record as _unit_record

__all__ = ["BuildConfig", "ordered_map", "_task_batches", "Encoder", "encode_device", "resolve_tokenizer",
           "tokenizer_info", "PARTS", "UnitOutput", "finished_part", "is_val", "part_path", "remove_temp_files",
           "write_index", "_unit_record"]
