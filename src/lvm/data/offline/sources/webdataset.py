"""Webdataset tars read as a stream (img2dataset's layout), never extracted to disk; gzipped tars
(`.tar.gz`, `.tgz`) are decompressed on the way (tarfile's stream mode detects the compression).

A tar holds samples as consecutive members sharing a key: `KEY.jpg` (or .jpeg/.png/.webp) plus
optional `KEY.json` and `KEY.txt`. As in webdataset, the key is the member path up to the first dot
of its file name and the rest is the extension (`a/000123.seg.png` -> key `a/000123`, ext `seg.png`).

`iter_samples` yields `Sample`s in tar order and, for what cannot be used, `Skip`s naming the tar
and the key: a sample without an image member, a member that cannot be read, a tar cut mid-member
(the whole samples before the cut are kept; the sample being read is dropped), a file that is not a
tar, a missing file. The image bytes are decoded later, by the decode workers.

A sample's id is `LABEL/KEY`, LABEL naming the tar (`lvm.data.offline.units.Unit.label`: its path below the
common folder of the inputs, so `laion/00000.tar` and `coyo/00000.tar` give different ids).
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass, field

from lvm.data.offline.sources import Skip

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Sample:
    key: str
    tar_path: str
    label: str = ""  # what names the tar in sample ids ("": its file name)
    members: dict[str, bytes] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return sample_id(self.label or self.tar_path.rsplit("/", 1)[-1], self.key)

    def image(self) -> tuple[str, bytes] | None:
        for ext in IMAGE_EXTS:
            for name, data in self.members.items():
                if name.lower() == ext:
                    return name, data
        return None


def split_key(member_name: str) -> tuple[str, str]:
    folder, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext if dot else "")


def sample_id(label: str, key: str) -> str:
    return f"{label}/{key}"


def iter_samples(tar_path: str, label: str = ""):
    """Samples (with an image) and Skips of one tar, in order; never raises for a bad tar. `label` names the
    tar in sample ids (its file name when not given)."""
    label = label or tar_path.rsplit("/", 1)[-1]

    def skip(key, reason):
        return Skip(source=tar_path, reason=reason, sentence=sample_id(label, key) if key else None, key=key)

    def close(sample):
        if sample is None:
            return None
        if sample.image() is None:
            has = ", ".join(sorted(sample.members)) or "nothing"
            return skip(sample.key, f"sample has no image member (jpg, jpeg, png, webp); it has: {has}")
        return sample

    try:
        f = open(tar_path, "rb")
    except FileNotFoundError:
        yield skip(None, "file not found")
        return
    except OSError as e:
        yield skip(None, f"cannot open: {e.strerror or e}")
        return
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|*")
        except (tarfile.TarError, EOFError, OSError) as e:
            yield skip(None, f"not a tar file ({e})")
            return
        current: Sample | None = None
        try:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if current is None or key != current.key:
                    done = close(current)
                    if done is not None:
                        yield done
                    current = Sample(key, tar_path, label)
                reader = tar.extractfile(m)
                data = reader.read() if reader is not None else b""
                if len(data) != m.size:
                    raise tarfile.ReadError("unexpected end of data")
                current.members[ext] = data
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            what = current.key if current is not None else None
            yield skip(what, f"tar truncated or corrupt mid-member ({e}); the samples before it are kept")
            return
        finally:
            tar.close()
        done = close(current)
        if done is not None:
            yield done


__all__ = ["Sample", "iter_samples", "split_key", "sample_id", "IMAGE_EXTS"]
