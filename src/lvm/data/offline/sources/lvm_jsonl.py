"""LVM's own tokenized data: JSONL, one visual sentence per line, `{"tokens": base64(int32 codes)}`.

As a source (`lvm_token_rows`), each such file is a unit of the offline stage (so ranks, resume, the
train/val split and index.json work as for images) whose lines are rows of codes, never re-tokenized; a
line whose length is not a positive multiple of 256 or whose codes leave 0..8191 is skipped and reported
by file and line number. What made the tokens is recorded in `tokenizer.json` from `--tokenizer-spec`
(or from `F.tokenizer.json` beside the first file, which `export_token_file` writes):
`imported_tokenizer_info`. `lvm.data.offline.pipeline.import_token_files` runs the import.

`export_token_file` writes shards back in LVM's format (int32 little-endian, standard base64), one
line per sentence in shard order, and `F.tokenizer.json` with the tokenizer folder as an absolute path
(and its weights' digest): a relative one would be relative to the shards, not to F.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from pathlib import Path

import numpy as np

from lvm.artifacts import TokenizerRecord, resolve_spec
from lvm.data.offline.sources import Skip
from lvm.data.offline.units import Unit, read_lines
from lvm.data.shards.format import SPLITS, ShardError, atomic_write_text, read_shard, temp_path
from lvm.model.vocab import CODEBOOK_SIZE, IMAGE_SIZE, TOKENS_PER_IMAGE
from lvm.tokenizer import load_tokenizer, parse_spec

CODE_DTYPE = "<i4"  # LVM's codes: int32, little-endian


def encode_line(codes: np.ndarray) -> str:
    """Codes -> one LVM token line (without the newline)."""
    return json.dumps({"tokens": base64.b64encode(codes.astype(CODE_DTYPE).tobytes()).decode("ascii")})


def decode_line(line: str) -> np.ndarray:
    """One LVM token line -> int32 codes."""
    return np.frombuffer(base64.b64decode(json.loads(line)["tokens"]), dtype=CODE_DTYPE)


def lvm_token_rows(unit: Unit, kind: str):
    """The source of an LVM token file: per line a row for a shard, or a Skip naming the file and line."""
    if not unit.exists:
        yield Skip(source=unit.path, reason="file not found")
        return
    name = Path(unit.path).name
    for n, _, raw in read_lines(unit):  # n: the line's number in the file, in every part of it
        text = raw.strip()
        if not text:
            continue
        sid = f"{name}:{n}"
        try:
            entry = json.loads(text.decode("utf-8"))
            if not isinstance(entry, dict) or not isinstance(entry.get("tokens"), str):
                raise ValueError("line is not a JSON object with a base64 string 'tokens'")
            data = base64.b64decode(entry["tokens"], validate=True)
            if len(data) % 4:
                raise ValueError(f"'tokens' decodes to {len(data)} bytes, not a whole number of int32")
            codes = np.frombuffer(data, dtype=CODE_DTYPE)
            if len(codes) == 0 or len(codes) % TOKENS_PER_IMAGE:
                raise ValueError(f"{len(codes)} tokens is not a positive multiple of {TOKENS_PER_IMAGE}")
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= CODEBOOK_SIZE:
                raise ValueError(f"token {hi if hi >= CODEBOOK_SIZE else lo} outside 0..{CODEBOOK_SIZE - 1}")
        except (ValueError, UnicodeDecodeError, binascii.Error) as e:
            yield Skip(source=f"{unit.path}:{n}", reason=f"bad LVM token line: {e}", sentence=sid, line=n)
            continue
        yield {"tokens": codes.astype(np.uint16), "n_images": len(codes) // TOKENS_PER_IMAGE, "kind": kind, "id": sid}


def sidecar(path: str | Path) -> Path:
    return Path(f"{path}.tokenizer.json")


def imported_tokenizer_info(spec: str | None, first_file: str, out: Path) -> dict:
    """tokenizer.json for imported tokens (`lvm.artifacts.TokenizerRecord`): from the spec (its folder described
    and its weights' digest taken when the folder is here; a relative folder is relative to the current one), or
    from the sidecar an export wrote (a relative spec there is relative to the sidecar's folder)."""
    if spec is None:
        side = sidecar(first_file)
        if not side.is_file():
            raise ValueError(f"say which tokenizer made these tokens with --tokenizer-spec (e.g. vqgan:<dir>); "
                             f"no {side} beside the input")
        record = TokenizerRecord.from_file(side)
    else:
        kind, path = parse_spec(resolve_spec(spec, Path.cwd()))
        if path and Path(path).is_dir():
            record = TokenizerRecord.of_tokenizer(load_tokenizer(f"{kind}:{path}", "cpu"), "squash")
        else:
            print(f"note: tokenizer folder {path} not found here: recorded by name only", file=sys.stderr)
            record = TokenizerRecord(kind=kind, path=path, codebook_size=CODEBOOK_SIZE, image_size=IMAGE_SIZE,
                                     tokens_per_image=TOKENS_PER_IMAGE, description={"kind": kind},
                                     extra={"resize": "squash"})
    return record.to_info(relative_to=out)


def _shard_files(shards: Path, split: str) -> list[Path]:
    splits = SPLITS if split == "all" else (split,)
    folders = [shards / s for s in splits if (shards / s).is_dir()] or [shards]
    files = [f for d in folders for f in sorted(d.glob("*.arrow"))]
    index = shards / "index.json"
    if index.is_file():  # the order the index lists (unit order), not the file names'
        listed = [shards / s["path"] for s in json.loads(index.read_text())["shards"]
                  if split == "all" or s["path"].startswith(f"{split}/")]
        if listed:
            files = listed
    if not files:
        raise ShardError(f"no shards to export in {shards} (split {split})")
    return files


def export_token_file(shards: str, out: str, split: str = "train") -> dict:
    """Shards -> one LVM token file (atomic); its tokenizer.json is copied to OUT.tokenizer.json."""
    root = Path(shards)
    if not root.is_dir():
        raise ShardError(f"--shards {root} does not exist")
    record = TokenizerRecord.from_shards(root)
    if record.codebook_size != CODEBOOK_SIZE or record.tokens_per_image != TOKENS_PER_IMAGE:
        raise ShardError(f"{root}: tokenizer.json says {record.tokens_per_image} codes of {record.codebook_size} "
                         f"per image; LVM's format holds {TOKENS_PER_IMAGE} of {CODEBOOK_SIZE}")
    info = record.with_digest().to_info()  # the folder absolute: the sidecar is read from elsewhere
    dst = Path(out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dst)
    n_lines = n_tokens = 0
    with tmp.open("w") as f:
        for shard in _shard_files(root, split):
            col = read_shard(shard).column("tokens").combine_chunks()
            flat = col.values.to_numpy(zero_copy_only=False)
            off = col.offsets.to_numpy()
            for i in range(len(col)):
                codes = flat[off[i] : off[i + 1]]
                f.write(encode_line(codes) + "\n")
                n_lines += 1
                n_tokens += len(codes)
    tmp.replace(dst)
    atomic_write_text(sidecar(dst), json.dumps(info, indent=2))
    return {"out": str(dst), "sentences": n_lines, "tokens": n_tokens}


__all__ = ["lvm_token_rows", "encode_line", "decode_line", "imported_tokenizer_info", "export_token_file", "sidecar"]
