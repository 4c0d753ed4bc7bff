"""Start a run from an existing model: a Hugging Face `LlamaForCausalLM` folder (`--init-from DIR`).

The folder holds `config.json` and its weights as `model.safetensors`, `pytorch_model.bin` (read with
`weights_only`), or either sharded with its `.index.json`. The architecture is the folder's config
(`--model` may be omitted; given, it must agree); the optimizer and the schedule start fresh.

LVM's released 7B is such a folder with `vocab_size` 8292 (codes 0..8191, then spare ids) and LLaMA's
`bos_token_id`/`eos_token_id` 1/2, which are visual codes here: the run sets this pipeline's
BOS/EOS/PAD (`lvm.model.vocab`), which lie inside its vocabulary. A vocabulary without room for them
(< 8195) or weights that do not fit the config (a missing, unexpected or misshapen tensor) stop the run
before any compute, with one line; only tensor headers are read for that check.

Loading streams one tensor at a time. Under ZeRO-1/2 the model is built on the meta device and
materialised uninitialised on the rank's device in the compute dtype (`lvm.train.engine.build_model`);
each tensor of a safetensors file is then read with plain file reads straight into its parameter (or,
when the dtype or device differs, into one temporary of that tensor's size), never through a memory map
(whose pages would stay resident in every rank until the file is closed: a whole file per rank). Under
ZeRO-3 the model is already partitioned (built inside `zero.Init`) and each parameter is gathered, filled
by rank 0 from the file and re-partitioned, so no rank ever holds more than one whole parameter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lvm.model.vocab import BOS_ID, CODEBOOK_SIZE, EOS_ID, N_SPECIAL, PAD_ID

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved; rebuilt from the config


class InitError(ValueError):
    pass


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files, safetensors first; a sharded checkpoint through its index."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise InitError(f"--init-from {folder}: {index} is not a weight index ({e})") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise InitError(f"--init-from {folder}: {index} names {missing[0]}, which is missing")
            return [folder / n for n in names]
    raise InitError(f"--init-from {folder}: no model.safetensors or pytorch_model.bin (or their .index.json)")


def _load_bin(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not in the zip format (very old torch.save): no memory map
        return torch.load(path, map_location="cpu", weights_only=True)


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor, from the safetensors headers (or a memory-mapped .bin)."""
    from safetensors import safe_open

    shapes = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as st:
                    for k in st.keys():
                        shapes[k] = tuple(st.get_slice(k).get_shape())
            else:
                shapes.update({k: tuple(t.shape) for k, t in _load_bin(f).items() if isinstance(t, torch.Tensor)})
        except Exception as e:  # a truncated or foreign file: one line naming it
            raise InitError(f"--init-from: cannot read {f}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return shapes


def read_config(folder: str | Path, seq_len: int):
    """The LlamaConfig of the folder, with this pipeline's special ids; InitError when it cannot be trained here."""
    from transformers import LlamaConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise InitError(f"--init-from {folder}: not a folder")
    f = folder / "config.json"
    if not f.is_file():
        raise InitError(f"--init-from {folder}: no config.json (a Hugging Face LlamaForCausalLM folder is expected)")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise InitError(f"--init-from {f}: not JSON ({e})") from None
    if raw.get("model_type") != "llama":
        raise InitError(f"--init-from {folder}: model_type {raw.get('model_type')!r}, a LlamaForCausalLM ('llama') is expected")
    try:
        cfg = LlamaConfig.from_pretrained(str(folder))
    except Exception as e:
        raise InitError(f"--init-from {folder}: invalid LlamaConfig: {str(e).splitlines()[0]}") from None
    need = CODEBOOK_SIZE + N_SPECIAL
    if cfg.vocab_size < need:
        raise InitError(f"--init-from {folder}: vocab_size {cfg.vocab_size} < {need}: no room for the {CODEBOOK_SIZE} "
                        f"visual codes and BOS/EOS/PAD ({BOS_ID}/{EOS_ID}/{PAD_ID})")
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = BOS_ID, EOS_ID, PAD_ID  # LVM's 1/2 are visual codes
    cfg.use_cache = False
    cfg.max_position_embeddings = max(cfg.max_position_embeddings or 0, seq_len)
    return cfg


def check_weights(folder: str | Path, cfg) -> list[Path]:
    """The weight files, once every parameter of LlamaForCausalLM(cfg) is there with its shape."""
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    files = weight_files(folder)
    got = tensor_shapes(files)
    with torch.device("meta"):
        want = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).named_parameters()}
    tied_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = [n for n in want if n not in got]
    unexpected = [n for n in got if n not in want and n not in tied_extra and not n.endswith(IGNORED_TENSORS)]
    wrong = [n for n in want if n in got and got[n] != want[n]]
    where = f"--init-from {folder}: the weights do not fit its config.json"
    if wrong:
        n = wrong[0]
        raise InitError(f"{where}: {n} is {list(got[n])}, the config makes it {list(want[n])}"
                        + (f" ({len(wrong)} tensors differ)" if len(wrong) > 1 else ""))
    if missing:
        raise InitError(f"{where}: {len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if unexpected:
        raise InitError(f"{where}: {len(unexpected)} tensor(s) it does not have, e.g. {unexpected[0]}")
    return files


def model_config(opts, given: set[str]):
    """The run's LlamaConfig: the preset/JSON of --model, or the --init-from folder's (checked against
    --model when both are given). Sets `opts.model` to the folder's config.json when --model was omitted."""
    from lvm.model.presets import llama_config

    if not opts.init_from:
        return llama_config(opts.model, opts.seq_len)
    cfg = read_config(opts.init_from, opts.seq_len)
    if "model" in given:
        preset = llama_config(opts.model, opts.seq_len)
        diff = [f"{k} {getattr(preset, k)} there, {getattr(cfg, k)} in the folder" for k in SHAPE_KEYS
                if getattr(preset, k) != getattr(cfg, k)]
        if diff:
            raise InitError(f"--model {opts.model} and --init-from {opts.init_from} disagree ({', '.join(diff)}): "
                            "omit --model (or drop `model` from the --config recipe) to take the folder's architecture")
    else:
        opts.model = str(Path(opts.init_from) / "config.json")
    check_weights(opts.init_from, cfg)
    return cfg


# safetensors' dtype names (little-endian on disk, as torch on every platform we run)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


class SafetensorsReader:
    """The tensors of one .safetensors file, read one at a time with plain reads (no memory map).

    The format: an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and
    byte range, then the data. `read(name, into)` fills `into` itself when it is a contiguous CPU tensor of
    the same dtype and shape (no copy at all), else a new tensor of the file's dtype."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb", buffering=0)
        try:
            n = int.from_bytes(self.file.read(8), "little")
            header = json.loads(self.file.read(n))
            header.pop("__metadata__", None)
            self.entries = {k: (ST_DTYPES[v["dtype"]], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()}
        except Exception as e:  # a truncated or foreign file (or an exotic dtype): one line naming it
            self.file.close()
            raise InitError(f"--init-from: cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.data_start = 8 + n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def keys(self) -> list[str]:
        return sorted(self.entries, key=lambda k: self.entries[k][2])  # file order: sequential reads

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        direct = (into is not None and into.device.type == "cpu" and into.dtype == dtype and tuple(into.shape) == shape
                  and into.is_contiguous())
        out = into if direct else torch.empty(shape, dtype=dtype)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        if len(view) != end - begin:
            raise InitError(f"--init-from: {self.path}: {name} has {end - begin} bytes, its header makes it {len(view)}")
        self.file.seek(self.data_start + begin)
        got = 0
        while got < len(view):
            k = self.file.readinto(view[got:])
            if not k:
                raise InitError(f"--init-from: {self.path} ends inside {name}")
            got += k
        return out


def _fill(dest: torch.Tensor, read) -> None:
    t = read(dest)
    if t.data_ptr() != dest.data_ptr():
        dest.copy_(t)


def _copy_into(param: torch.nn.Parameter, read, rank: int) -> None:
    if hasattr(param, "ds_id"):  # a ZeRO-3 partitioned parameter: gather, fill on rank 0, re-partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    _fill(param.data, read)
    else:
        with torch.no_grad():
            _fill(param.data, read)


@torch.no_grad()
def load_weights(model, folder: str | Path, rank: int) -> int:
    """Copy the folder's tensors into `model` one at a time; returns how many parameters were set."""
    params = dict(model.named_parameters())
    done = set()
    under_zero3 = any(hasattr(p, "ds_id") for p in params.values())
    for f in weight_files(Path(folder)):
        if f.suffix == ".safetensors":
            with SafetensorsReader(f) as st:
                for name in st.keys():
                    if name in params and name not in done:
                        if under_zero3 and rank != 0:  # only rank 0 reads; the others take part in the gather
                            _copy_into(params[name], None, rank)
                        else:
                            _copy_into(params[name], lambda into, n=name: st.read(n, into), rank)
                        done.add(name)
        else:
            state = _load_bin(f)
            for name, t in state.items():
                if name in params and name not in done:
                    _copy_into(params[name], lambda into, t=t: t, rank)
                    done.add(name)
            del state
    left = sorted(set(params) - done)
    if left:
        raise InitError(f"--init-from {folder}: no weights for {left[0]} ({len(left)} parameters)")
    return len(done)
