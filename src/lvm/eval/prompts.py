"""LVM's evaluation files: perplexity of target images given input images, and generation from visual prompts,
one JSON object per line (the format of LVM's `eval_perplexity.py` and `batch_generation.py`).

    {"input": ["a.jpg", "a_seg.png", "b.jpg"], "target": ["b_seg.png"]}     evaluation: perplexity of the targets
    {"input": ["f0.jpg", "f1.jpg", "f2.jpg"], "output": "gen/clip7.png"}     generation: candidates for what follows

`input` lists the context images in order, few-shot examples included. Relative image paths resolve against a
base folder (the file's own folder unless told otherwise), a relative `output` against the output folder. Every
image is read as the shards' images were (`lvm.tokenizer.preprocess.load_image`, with the resize the tokenizer
record names) and tokenized by the model's tokenizer.

Evaluation scores the sentence `[BOS] inputs targets` (`lvm.model.vocab.frame`, cut before its EOS): the NLL of
every target token, as `lvm.eval.perplexity` scores the same images inside a sentence. A line's perplexity is
exp of its mean target NLL; LVM's figure for a file is the mean of those over the lines. Generation samples
`n_images` new images per candidate after `[BOS] inputs` and writes LVM's layout at `output`: one image, a row
per candidate, the new images side by side; with several candidates each row also goes to
`<output stem>_<c><suffix>`.

Inputs that do not fit the model's window next to the targets (or the new images) are cut from the left by
whole images, as `lvm.eval.generate.fit_prompt` cuts a prompt, and the result line says how many. A bad line
(not JSON, not an object, a key missing or of the wrong type, an image missing or undecodable, targets longer
than the window) is skipped: its result line holds its number and the reason, and the other lines go on.
Results come one per line of the file, in its order (blank lines are no lines).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lvm.eval.generate import Sampling, prompt_room, sample_batch
from lvm.eval.perplexity import token_losses
from lvm.model.vocab import TOKENS_PER_IMAGE, frame
from lvm.tokenizer.preprocess import SourceError, load_image, to_pixels, to_uint8

DECODE_THREADS = 4
ENCODE_IMAGES = 64  # images per tokenizer call


@dataclass
class PromptLine:
    number: int  # 1-based line number in the file
    inputs: list[Path]
    targets: list[Path]  # evaluation
    output: Path | None  # generation


@dataclass
class BadLine:
    number: int
    reason: str

    def result(self) -> dict:
        return {"line": self.number, "error": self.reason}


def _paths(value, key: str, base: Path, allow_empty: bool) -> list[Path]:
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise ValueError(f'"{key}" must be a list of image paths')
    if not value and not allow_empty:
        raise ValueError(f'"{key}" lists no image')
    return [base / x for x in value]  # an absolute x stays as it is


def read_prompts(path: str | Path, task: str, base: str | Path | None = None,
                 out: str | Path | None = None) -> list[PromptLine | BadLine]:
    """The file's lines, parsed: `task` "evaluate" needs `input` and `target`, "generate" `input` and `output`
    (resolved against `out`). `base` defaults to the file's folder. OSError when the file cannot be read."""
    path = Path(path)
    base = path.parent if base is None else Path(base)
    out = Path(out) if out is not None else Path.cwd()
    second = "target" if task == "evaluate" else "output"
    lines: list[PromptLine | BadLine] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f'not a JSON object with "input" and "{second}"')
                missing = [k for k in ("input", second) if k not in rec]
                if missing:
                    raise ValueError(f"no {' and no '.join(repr(k) for k in missing)} key")
                inputs = _paths(rec["input"], "input", base, allow_empty=True)
                if task == "evaluate":
                    lines.append(PromptLine(number, inputs, _paths(rec["target"], "target", base, False), None))
                else:
                    if not isinstance(rec["output"], str) or not rec["output"]:
                        raise ValueError('"output" must be an image path')
                    output = out / rec["output"]
                    _image_format(output)
                    lines.append(PromptLine(number, inputs, [], output))
            except ValueError as e:
                lines.append(BadLine(number, str(e)))
    return lines


def _image_format(path: Path) -> str:
    from PIL import Image

    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f'"output" {path.name}: not an image file name (.png, .jpg, ...)')
    return fmt


class ImageCodes:
    """Image files -> codes [n, 256] with the model's tokenizer; a batch's files are decoded in threads, each
    distinct file once (few-shot examples shared by lines of a batch)."""

    def __init__(self, tok, resize: str = "squash"):
        self.tok, self.resize = tok, resize
        self.pool = ThreadPoolExecutor(DECODE_THREADS)

    def _load(self, p: Path):
        try:
            return load_image(p, self.tok.image_size, self.resize)
        except (SourceError, OSError, ValueError) as e:
            return SourceError(f"image {p}: {e}")

    def lines(self, lines: list[PromptLine]) -> list[tuple[torch.Tensor, torch.Tensor] | str]:
        """Per line (input codes [k, 256], target codes [t, 256]), or the reason it cannot be read."""
        files = list(dict.fromkeys(p for ln in lines for p in ln.inputs + ln.targets))
        pixels = dict(zip(files, self.pool.map(self._load, files), strict=True))
        good = [p for p in files if not isinstance(pixels[p], Exception)]
        codes: dict[Path, torch.Tensor] = {}
        for i in range(0, len(good), ENCODE_IMAGES):
            chunk = good[i : i + ENCODE_IMAGES]
            with torch.no_grad():
                enc = self.tok.encode(to_pixels(np.stack([pixels[p] for p in chunk]))).long().cpu()
            codes.update(zip(chunk, enc, strict=True))
        out = []
        for ln in lines:
            bad = next((pixels[p] for p in ln.inputs + ln.targets if isinstance(pixels[p], Exception)), None)
            if bad is not None:
                out.append(str(bad))
                continue
            stack = [torch.stack([codes[p] for p in ps]) if ps else torch.zeros(0, TOKENS_PER_IMAGE, dtype=torch.long)
                     for ps in (ln.inputs, ln.targets)]
            out.append((stack[0], stack[1]))
        return out

    def close(self) -> None:
        self.pool.shutdown()


def _decoded_batches(lines: list, batch_size: int, images, bad: Callable[[BadLine], None]) -> Iterator[tuple[int, list]]:
    """Per batch of `batch_size` lines: its size and [(line, images.lines() of it)] for the lines that parsed and
    whose images decoded; every other line goes to `bad`, in file order within the batch."""
    for i in range(0, len(lines), batch_size):
        batch = lines[i : i + batch_size]
        for b in batch:
            if isinstance(b, BadLine):
                bad(b)
        good = [ln for ln in batch if isinstance(ln, PromptLine)]
        decoded = []
        for ln, got in zip(good, images.lines(good), strict=True):
            if isinstance(got, str):
                bad(BadLine(ln.number, got))
            else:
                decoded.append((ln, got))
        yield len(batch), decoded


def _ordered(results: dict[int, dict]) -> list[dict]:
    return [results[k] for k in sorted(results)]


def score_prompts(model, images: ImageCodes, lines: list[PromptLine | BadLine], window: int, batch_size: int = 4,
                  on_bad: Callable[[BadLine], None] | None = None, progress: bool = True) -> list[dict]:
    """One result per line, in file order: {"line", "perplexity", "nll", "tokens", "target_perplexities",
    "inputs_used", "inputs_dropped"} for a scored line (NLL in nats, summed over its target tokens), else
    {"line", "error"}. `on_bad` hears of each skipped line as it is found."""
    device = next(model.parameters()).device
    results: dict[int, dict] = {}

    def bad(b: BadLine):
        results[b.number] = b.result()
        if on_bad:
            on_bad(b)

    bar = tqdm(total=len(lines), unit="line", desc="eval", disable=not progress)
    for n_lines, decoded in _decoded_batches(lines, batch_size, images, bad):
        todo = []
        for ln, (inputs, targets) in decoded:
            if targets.numel() > window:
                bad(BadLine(ln.number, f"{len(targets)} target images ({targets.numel()} tokens) do not fit the "
                                       f"model's window of {window} tokens"))
                continue
            keep = min(len(inputs), (window - targets.numel()) // TOKENS_PER_IMAGE)
            codes = torch.cat([inputs[len(inputs) - keep :], targets]).reshape(-1).numpy()
            todo.append((ln, keep, len(inputs) - keep, targets.numel(), frame(codes, end=len(codes) + 1)))
        if todo:
            losses = token_losses(model, [t[-1] for t in todo], device)
            for (ln, keep, dropped, n, _), nll in zip(todo, losses, strict=True):
                tgt = nll[-n:].astype(np.float64)
                per_image = tgt.reshape(-1, TOKENS_PER_IMAGE).mean(1)
                results[ln.number] = {"line": ln.number, "perplexity": math.exp(tgt.mean()), "nll": float(tgt.sum()),
                                      "tokens": n, "target_perplexities": [math.exp(x) for x in per_image],
                                      "inputs_used": keep, "inputs_dropped": dropped}
        bar.update(n_lines)
    bar.close()
    return _ordered(results)


def summary(results: list[dict]) -> dict:
    """LVM's figure (the mean over lines of each line's perplexity) and the perplexity over all target tokens."""
    ok = [r for r in results if "error" not in r]
    nll, n = sum(r["nll"] for r in ok), sum(r["tokens"] for r in ok)
    return {"lines": len(results), "scored": len(ok), "skipped_lines": [r["line"] for r in results if "error" in r],
            "perplexity": float(np.mean([r["perplexity"] for r in ok])) if ok else float("nan"),
            "perplexity_over_tokens": math.exp(nll / n) if n else float("nan"), "tokens": n}


def _save_image(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels).save(tmp, format=_image_format(path))
    os.replace(tmp, path)


def write_candidates(pixels: np.ndarray, output: Path) -> list[Path]:
    """pixels uint8 [candidates, n_images, H, W, 3] -> LVM's grid at `output` (a row per candidate, the new images
    side by side) and, with several candidates, each row as `<stem>_<c><suffix>`. The candidates' paths."""
    rows = [np.concatenate(list(c), axis=1) for c in pixels]  # [H, n W, 3] each
    _save_image(np.concatenate(rows, axis=0), output)
    if len(rows) == 1:
        return [output]
    paths = [output.with_name(f"{output.stem}_{c}{output.suffix}") for c in range(len(rows))]
    for row, p in zip(rows, paths, strict=True):
        _save_image(row, p)
    return paths


def generate_prompts(model, images: ImageCodes, lines: list[PromptLine | BadLine], window: int, s: Sampling,
                     batch_size: int = 4, on_bad: Callable[[BadLine], None] | None = None,
                     progress: bool = True) -> list[dict]:
    """One result per line, in file order: {"line", "output", "candidates", "inputs_used", "inputs_dropped"},
    else {"line", "error"}. `s.num_samples` candidates of `s.n_images` images each; lines of a batch with as many
    prompt images share one `generate` call, seeded with `s.seed` and the first line's number (the same file,
    seed and batch size give the same images)."""
    room = prompt_room(window, s.n_images)
    results: dict[int, dict] = {}

    def bad(b: BadLine):
        results[b.number] = b.result()
        if on_bad:
            on_bad(b)

    bar = tqdm(total=len(lines), unit="line", desc="generate", disable=not progress)
    for n_lines, decoded in _decoded_batches(lines, batch_size, images, bad):
        groups: dict[int, list] = {}
        for ln, got in decoded:
            inputs = got[0]
            keep = min(len(inputs), room)
            groups.setdefault(keep, []).append((ln, inputs[len(inputs) - keep :], len(inputs) - keep))
        for keep, members in groups.items():
            prompts = torch.stack([m[1] for m in members])
            seeded = Sampling(s.n_images, s.temperature, s.top_k, s.top_p, s.seed * 1_000_003 + members[0][0].number,
                              s.num_samples, s.use_cache)
            new = sample_batch(model, prompts, seeded)  # [B, S, n, 256]
            with torch.no_grad():
                px = to_uint8(images.tok.decode(new.reshape(-1, TOKENS_PER_IMAGE)))
            px = px.reshape(*new.shape[:3], *px.shape[1:])
            for (ln, _, dropped), cand in zip(members, px, strict=True):
                try:
                    paths = write_candidates(cand, ln.output)
                except (OSError, ValueError) as e:
                    bad(BadLine(ln.number, f"cannot write {ln.output}: {e}"))
                    continue
                results[ln.number] = {"line": ln.number, "output": str(ln.output), "candidates": [str(p) for p in paths],
                                      "inputs_used": keep, "inputs_dropped": dropped}
        bar.update(n_lines)
    bar.close()
    return _ordered(results)


def write_results(results: list[dict], path: str | Path) -> None:
    """The result lines as JSONL, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def tokenizer_for(checkpoint: str | Path, spec: str | None, device=None):
    """(the tokenizer, its resize mode): the one recorded with the model, or `spec` (which must be the same
    tokenizer where the model records one; it may sit in another folder). ValueError when the model records
    none and no spec is given, or `spec` names another tokenizer."""
    from lvm.artifacts import TokenizerRecord, locate
    from lvm.tokenizer import load_tokenizer

    record = locate(checkpoint).tokenizer()
    resize = (record.extra.get("resize") if record is not None else None) or "squash"
    if not spec:
        if record is None:
            raise ValueError(f"{checkpoint} records no tokenizer (tokenizer.json): pass --tokenizer")
        return record.load(device), resize
    tok = load_tokenizer(spec, device)
    why = record and TokenizerRecord.of_tokenizer(tok).mismatch(record, "the model's")
    if why:
        raise ValueError(f"--tokenizer {spec} is not the tokenizer the model was trained with ({why})")
    return tok, resize
