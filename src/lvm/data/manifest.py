"""Re-exports only: the manifest source is `lvm.data.offline.sources.manifest`.

Why this file is still here: `lvm.data.store`, `lvm.data.compose`, `lvm.data.labelled` and their tests were
written against this path while the offline package was made; they import these names from here until they
import them from there. Then this file goes. No logic lives here.
"""

from lvm.data.offline.sources import Skip
from lvm.data.offline.sources.manifest import (
    DEFAULT_MAX_IMAGES,
    IMAGE_EXTS,
    _files,
    parse_line,
    write_manifest,
)

__all__ = ["Skip", "DEFAULT_MAX_IMAGES", "IMAGE_EXTS", "_files", "parse_line", "write_manifest"]
