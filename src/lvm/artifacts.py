"""What made a set of tokens, and when two sets of tokens share a vocabulary: `TokenizerRecord`.

A tokenizer is recorded in `tokenizer.json`: beside shards (written by make_shards and by the LVM JSONL import),
in a training run's folder, as `lvm_tokenizer.json` in an exported model, and as `F.tokenizer.json` beside an
exported token file. The record holds the spec (`kind:<folder>`), the geometry (codebook size, image size,
tokens per image), the tokenizer's own description (`details`: the patch-kmeans grid and fit, the VQGAN config)
and, since this module exists, `digest`: the sha256 of the weights file its loader reads (`codebook.safetensors`
of a patch-kmeans folder, `model.safetensors` or `pytorch_model.bin` of a VQGAN folder), taken when the file is
written.

Paths. A tokenizer folder inside the folder a record is written to is recorded relative to it (the shards can
move with their tokenizer); any other folder is recorded as an absolute path (a spec given relative to the
current directory is made absolute first). Reading resolves a relative spec against the folder of the file;
a run's `tokenizer.json` also carries `spec_resolved`, which wins.

The one definition of "the same tokenizer" (`TokenizerRecord.mismatch`; `compatible` is "no mismatch"), used by
training (train and validation shards, the sources of a mixture), evaluation, generation and the JSONL
import/export. Two records are the same tokenizer when
  - the kind (from the spec) is the same, and the codebook size, image size and tokens per image where both
    record them;
  - the descriptions are equal (paths never compared: how a folder is spelled is not what it holds);
  - neither record is stale: where a record's folder is here, its weights still have the recorded digest (a
    folder fitted again after its tokens were made no longer holds the tokenizer that made them);
  - their digests are equal where both are known. A record's digest is the one it recorded; an older
    `tokenizer.json` without one takes its folder's digest when the folder is here. Where a digest is known on
    one side only, or on neither (an older record whose folder is gone, a record made "by name only"), the
    comparison rests on the kind, the geometry and the description: a patch-kmeans description names its fit
    (seed, images, patches, final error), but two VQGANs of one architecture are told apart only by digest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from lvm.tokenizer import load_tokenizer, parse_spec

TOKENIZER_JSON = "tokenizer.json"
GEOMETRY = ("codebook_size", "image_size", "tokens_per_image")
# keys of tokenizer.json read into the record's fields; any other key (resize) is kept as it was
_OWN_KEYS = {"spec", "spec_resolved", "kind", "digest", "details", *GEOMETRY}


def weights_file(kind: str, folder: str | Path) -> Path | None:
    """The file a tokenizer's loader reads its weights from (None when the folder has none)."""
    from lvm.tokenizer.vqgan import WEIGHT_FILES

    names = ("codebook.safetensors",) if kind == "patch-kmeans" else WEIGHT_FILES
    return next((Path(folder) / n for n in names if (Path(folder) / n).is_file()), None)


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def weights_digest(kind: str, folder: str | Path | None) -> str | None:
    """sha256 of the tokenizer's weights file, `sha256:<hex>` (None when the folder or the file is not here)."""
    if folder is None or not Path(folder).is_dir():
        return None
    f = weights_file(kind, folder)
    if f is None:
        return None
    st = f.stat()
    return _file_digest(str(f.resolve()), st.st_size, st.st_mtime_ns)


def resolve_spec(spec: str, base: str | Path | None) -> str:
    """`kind:<absolute folder>`: a relative folder resolved against `base` (kept as written when `base` is None);
    a spec without a folder as it is."""
    kind, path = parse_spec(spec)
    if path is None:
        return spec
    p = Path(path)
    if not p.is_absolute():
        if base is None:
            return spec
        p = Path(base) / p
    return f"{kind}:{p.resolve()}"


def relative_spec(spec: str, folder: str | Path) -> str:
    """The spec as written into a file in `folder`: its tokenizer folder relative to `folder` when inside it
    (they move together), else absolute. `spec` must be absolute (`resolve_spec`)."""
    kind, path = parse_spec(spec)
    if path is None or not Path(path).is_absolute():
        return spec
    p, root = Path(path).resolve(), Path(folder).resolve()
    return f"{kind}:{p.relative_to(root)}" if p.is_relative_to(root) else f"{kind}:{p}"


def find_tokenizer_json(shards_root: str | Path) -> Path:
    """tokenizer.json of a shard folder: in it, or one level up (`train/` and `val/` of a make_shards folder)."""
    from lvm.data.shards import ShardError

    root = Path(shards_root)
    for cand in (root / TOKENIZER_JSON, root.parent / TOKENIZER_JSON):
        if cand.is_file():
            return cand
    raise ShardError(f"no {TOKENIZER_JSON} in {root} or {root.parent}: cannot tell what made these tokens")


@dataclass(frozen=True)
class TokenizerRecord:
    """What made a set of tokens (the module docstring says how two records compare)."""

    kind: str
    path: str | None  # the tokenizer folder, absolute where the record says where it was written from
    codebook_size: int | None = None
    image_size: int | None = None
    tokens_per_image: int | None = None
    digest: str | None = None  # recorded with the tokens; None in older files
    description: dict = field(default_factory=dict)  # the tokenizer's own description, without its path
    extra: dict = field(default_factory=dict)  # the file's other keys (resize), kept

    # -- reading

    @classmethod
    def from_info(cls, info: dict, base: str | Path | None = None) -> TokenizerRecord:
        """A record from tokenizer.json's content; a relative spec resolved against `base` (its file's folder)."""
        spec = str(info.get("spec_resolved") or info.get("spec") or "")
        kind, _ = parse_spec(spec)
        _, path = parse_spec(resolve_spec(spec, base))
        details = info.get("details") or {}
        return cls(kind=kind, path=path, codebook_size=info.get("codebook_size"), image_size=info.get("image_size"),
                   tokens_per_image=info.get("tokens_per_image"), digest=info.get("digest"),
                   description={k: v for k, v in details.items() if k != "spec"},
                   extra={k: v for k, v in info.items() if k not in _OWN_KEYS})

    @classmethod
    def from_file(cls, path: str | Path) -> TokenizerRecord:
        """A tokenizer.json (or lvm_tokenizer.json, or an export's F.tokenizer.json), relative to its folder."""
        path = Path(path)
        return cls.from_info(json.loads(path.read_text()), path.parent)

    @classmethod
    def from_shards(cls, shards_root: str | Path) -> TokenizerRecord:
        """The record beside a shard folder (`find_tokenizer_json`); ShardError when there is none."""
        return cls.from_file(find_tokenizer_json(shards_root))

    @classmethod
    def of_tokenizer(cls, tok, resize: str | None = None) -> TokenizerRecord:
        """The record of a loaded tokenizer (its folder made absolute; its weights' digest taken now)."""
        spec = resolve_spec(tok.spec, Path.cwd())
        _, path = parse_spec(spec)
        return cls(kind=tok.kind, path=path, codebook_size=tok.codebook_size, image_size=tok.image_size,
                   tokens_per_image=tok.tokens_per_image, digest=weights_digest(tok.kind, path),
                   description={k: v for k, v in tok.describe().items() if k != "spec"},
                   extra={} if resize is None else {"resize": resize})

    # -- where it is

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.path}" if self.path else self.kind

    @property
    def folder(self) -> Path | None:
        """The tokenizer folder where it is here (an absolute path that exists), else None."""
        if self.path and Path(self.path).is_absolute() and Path(self.path).is_dir():
            return Path(self.path)
        return None

    def current_digest(self) -> str | None:
        """The digest of the weights now in the folder (None when the folder is not here)."""
        return weights_digest(self.kind, self.folder)

    def known_digest(self) -> str | None:
        """The recorded digest; for an older record without one, its folder's where the folder is here."""
        return self.digest or self.current_digest()

    def with_digest(self) -> TokenizerRecord:
        """This record with `known_digest()` recorded (what a file written from it should carry)."""
        return dataclasses.replace(self, digest=self.known_digest())

    def load(self, device=None):
        """The tokenizer itself (`lvm.tokenizer.load_tokenizer`)."""
        return load_tokenizer(self.spec, device)

    # -- writing

    def to_info(self, relative_to: str | Path | None = None) -> dict:
        """tokenizer.json's content; the folder relative to `relative_to` when inside it (else absolute)."""
        spec = self.spec if relative_to is None else relative_spec(self.spec, relative_to)
        info = {"spec": spec, "kind": self.kind}
        info.update({k: getattr(self, k) for k in GEOMETRY if getattr(self, k) is not None})
        info.update(self.extra)
        if self.digest:
            info["digest"] = self.digest
        info["details"] = dict(self.description)
        return info

    # -- comparing

    def stale(self) -> str | None:
        """Why the folder no longer holds the tokenizer this record names (its weights changed), or None."""
        now = self.current_digest() if self.digest else None
        if now is not None and now != self.digest:
            return f"the weights in {self.folder} changed after the tokens were made (digest {now[:19]}, recorded {self.digest[:19]})"
        return None

    def mismatch(self, other: TokenizerRecord, theirs: str = "the other's") -> str | None:
        """Why tokens made by this record's tokenizer are not in `other`'s vocabulary, or None when they are the
        same tokenizer. `theirs` names the other side in the reason ("the model's")."""
        if self.kind != other.kind:
            return f"kind {self.kind} vs {theirs} {other.kind}"
        for key in GEOMETRY:
            a, b = getattr(self, key), getattr(other, key)
            if a is not None and b is not None and a != b:
                return f"{key} {a} vs {theirs} {b}"
        if self.description != other.description:
            keys = sorted(k for k in self.description.keys() | other.description.keys()
                          if self.description.get(k) != other.description.get(k))
            return f"the tokenizers differ in {', '.join(keys)}"
        for record in (self, other):
            why = record.stale()
            if why:
                return why
        a, b = self.known_digest(), other.known_digest()
        if a and b and a != b:
            return f"the tokenizers' weights differ ({a[:19]} vs {theirs} {b[:19]})"
        return None

    def compatible(self, other: TokenizerRecord) -> bool:
        """The same tokenizer: tokens of one are tokens of the other (`mismatch` is None)."""
        return self.mismatch(other) is None


__all__ = ["TokenizerRecord", "find_tokenizer_json", "relative_spec", "resolve_spec", "weights_digest", "weights_file"]
