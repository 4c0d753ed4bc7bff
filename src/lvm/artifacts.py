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

A run and its models: `locate(path)` (an `Artifact`). Whatever path a user gives a CLI (`--checkpoint`,
`--resume`) names one of
  RUN/                                a run folder of launch/pretrain.py: model_config.json, tokenizer.json, ...
  RUN/checkpoints/                    its DeepSpeed checkpoints (`latest` names the newest complete tag)
  RUN/checkpoints/latest              that file
  RUN/checkpoints/step_00000100/      one tag (or a file inside it)
  HF/                                 an exported Hugging Face folder: config.json, weights, lvm_tokenizer.json
and `locate` says which: the run folder, the checkpoint tag, the HF folder, the model's config and its tokenizer.
It is the one place that knows this layout; nothing else walks folders looking for a model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
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
    from lvm.data.shards.format import ShardError

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


# -- a run and its models

RUN_CONFIG = "model_config.json"  # the model of a run folder (launch/pretrain.py)
HF_CONFIG = "config.json"  # the model of a Hugging Face folder
EXPORT_TOKENIZER = "lvm_tokenizer.json"  # the tokenizer.json of the run an HF folder was exported from
CHECKPOINTS = "checkpoints"
LATEST = "latest"  # written by DeepSpeed once every rank finished saving a tag
TAG_RE = re.compile(r"step_\d{8}")


class CheckpointError(ValueError):
    pass


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag `ckpt_dir/latest` names, when that tag's folder is there."""
    f = Path(ckpt_dir) / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def is_hf_folder(p: Path) -> bool:
    return (p / HF_CONFIG).is_file() and (any(p.glob("*.safetensors")) or (p / "pytorch_model.bin").is_file())


@dataclass(frozen=True)
class Artifact:
    """What a path names (`locate`): a run, one of its checkpoints, or an exported model."""

    path: Path  # as given
    flag: str  # the option it was given with, for messages
    run_dir: Path | None = None  # a run folder with its model_config.json
    ckpt_dir: Path | None = None  # DeepSpeed's save folder (RUN/checkpoints)
    tag: str | None = None  # the checkpoint tag in it to load
    hf_dir: Path | None = None  # an exported Hugging Face folder

    @property
    def config_file(self) -> Path | None:
        """The model's config: config.json of an HF folder, model_config.json of the run."""
        if self.hf_dir is not None:
            return self.hf_dir / HF_CONFIG
        return self.run_dir / RUN_CONFIG if self.run_dir is not None else None

    def config(self) -> dict:
        if self.config_file is None:
            raise CheckpointError(f"{self.flag} {self.path}: no {RUN_CONFIG} beside the checkpoint: "
                                  "not a run folder of launch/pretrain.py")
        return json.loads(self.config_file.read_text())

    def window(self) -> int:
        """The model's context window, from its config alone (no weights are read)."""
        return int(self.config()["max_position_embeddings"])

    @property
    def tokenizer_file(self) -> Path | None:
        """What made the tokens the model was trained on, where the model records it."""
        f = self.hf_dir / EXPORT_TOKENIZER if self.hf_dir is not None else \
            self.run_dir / TOKENIZER_JSON if self.run_dir is not None else None
        return f if f is not None and f.is_file() else None

    def tokenizer_info(self) -> dict | None:
        """The tokenizer.json content (None when the model records no tokenizer)."""
        return json.loads(self.tokenizer_file.read_text()) if self.tokenizer_file else None

    def tokenizer(self) -> TokenizerRecord | None:
        return TokenizerRecord.from_file(self.tokenizer_file) if self.tokenizer_file else None

    def checkpoint(self) -> tuple[Path, str]:
        """(DeepSpeed's save folder, tag); CheckpointError where the path names none."""
        if self.tag is not None:
            return self.ckpt_dir, self.tag
        if self.hf_dir is not None:
            why = "a Hugging Face model folder, not a DeepSpeed checkpoint (--init-from starts a run from one)"
        elif self.ckpt_dir is not None and (self.ckpt_dir / LATEST).is_file():
            why = f"{self.ckpt_dir / LATEST} names a missing tag"
        else:
            why = "no DeepSpeed checkpoint there"
        raise CheckpointError(f"{self.flag} {self.path}: {why}")


def _run_of(ckpt_dir: Path) -> Path | None:
    return ckpt_dir.parent if (ckpt_dir.parent / RUN_CONFIG).is_file() else None


def locate(path: str | Path, flag: str = "--checkpoint") -> Artifact:
    """What `path` names (the module docstring lists the paths); `flag` names it in messages. FileNotFoundError
    where it does not exist, CheckpointError where it is none of these. A run folder without a checkpoint yet
    still has its config (`Artifact.checkpoint()` says there is none)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{flag} {p} does not exist")
    if p.is_file() and p.name == LATEST:
        return Artifact(p, flag, _run_of(p.parent), p.parent, latest_tag(p.parent))
    if p.is_file() and TAG_RE.fullmatch(p.parent.name):  # a file inside a tag
        p = p.parent
    if p.is_dir() and is_hf_folder(p):
        return Artifact(p, flag, hf_dir=p)
    if p.is_dir() and TAG_RE.fullmatch(p.name):
        return Artifact(p, flag, _run_of(p.parent), p.parent, p.name)
    if p.is_dir() and (p / LATEST).is_file():
        return Artifact(p, flag, _run_of(p), p, latest_tag(p))
    if p.is_dir() and ((p / RUN_CONFIG).is_file() or (p / CHECKPOINTS).is_dir()):
        run = p if (p / RUN_CONFIG).is_file() else None
        return Artifact(p, flag, run, p / CHECKPOINTS, latest_tag(p / CHECKPOINTS))
    raise CheckpointError(f"{flag} {p}: no run folder, DeepSpeed checkpoint or Hugging Face model there")


__all__ = ["Artifact", "CheckpointError", "TokenizerRecord", "find_tokenizer_json", "latest_tag", "locate",
           "relative_spec", "resolve_spec", "weights_digest", "weights_file"]
