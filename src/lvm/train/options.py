"""Every option of `launch/pretrain.py`: its one default (`RunOptions`), its help text, and the parser.

The parser is jsonargparse's. Besides flags it reads YAML run recipes (`--config configs/lvm-1b.yaml`) whose
keys are the option names (`seq_len: 4096`). A value a recipe sets counts as given, exactly like a flag: it
must agree with a concrete ds_config value, it fixes what the planner may choose, and on resume it may
replace a field of the checkpoint's schedule (where the steps already taken keep their learning rate).
Flags win over recipes wherever they stand on the command line; of two recipes the later one wins.
`--print-config` writes the resolved run as a recipe: the given values as keys and every other value as a
comment, so that feeding it back with `--config` gives the same options with the same ones given.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from lvm.model.presets import DEFAULT_SEQ_LEN, PRESETS
from lvm.train.optimizers import OPTIMIZERS
from lvm.train.schedule import SCHEDULES, default_warmup


@dataclass
class RunOptions:
    data: list[str] = field(default_factory=lambda: ["data/shards"])
    data_weights: list[float] | None = None
    val_data: list[str] | None = None
    verify_data: bool = False
    model: str = "tiny"
    init_from: str | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    output: str | None = None
    ds_config: str = "ds_configs/zero3.json"
    max_steps: int = 1000
    lr: float = 1.5e-4
    min_lr: float = 3e-5
    warmup_steps: int | None = None
    lr_schedule: str = "cosine"
    decay_steps: int | None = None
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    micro_batch: int = 1
    grad_accum: int = 1
    global_batch_tokens: int | None = None
    grad_ckpt: bool = False
    precision: str = "auto"
    save_every: int = 500
    save_every_minutes: float | None = None
    keep_last: int = 3
    eval_every: int = 500
    eval_max_sentences: int | None = None
    log_every: int = 10
    resume: str = "auto"
    data_changed: str = "refuse"
    packing: str = "concat"
    max_bad_steps: int = 10
    gpu_mem_gib: float | None = None
    optimizer: str = "adamw"
    attention: str = "auto"
    kernels: str = "none"
    compile: bool = False

    def run_dir(self) -> str:
        name = Path(self.init_from).name if self.init_from else self.model.replace("/", "_")
        return self.output or f"runs/{name}-s{self.seq_len}"


HELP = {
    "data": "training sources: make_shards output folders (each uses its train/) or folders of *.arrow files; "
            "several make a weighted mixture",
    "data_weights": "share of the windows drawn from each --data source (normalised; default: proportional to tokens)",
    "val_data": "validation shards, one folder per --data source (default: SOURCE/val, or SOURCE/../val)",
    "verify_data": "read every token of every shard before training (default: check sizes and recorded counts only)",
    "model": f"preset ({', '.join(PRESETS)}) or a path to a LlamaConfig JSON",
    "init_from": "start from this Hugging Face LlamaForCausalLM folder (e.g. LVM-7B): its config.json is the "
                 "architecture (--model may be omitted), its weights the start; the optimizer starts fresh "
                 "(default: none, random initialisation)",
    "seq_len": "tokens per training window",
    "output": "run folder (default runs/<model>-s<seq_len>): checkpoints/, tensorboard/, metrics.jsonl",
    "ds_config": "DeepSpeed JSON; values it leaves \"auto\" are filled from these flags",
    "max_steps": "optimizer steps to train",
    "lr": "peak learning rate (LVM: 1.5e-4)",
    "min_lr": "learning rate at the end of the decay (LVM: 3e-5)",
    "warmup_steps": "linear warmup steps (default: LVM's 8000, at most a tenth of --decay-steps)",
    "lr_schedule": "cosine (LVM), wsd (warmup, stable, then a linear decay over the last --decay-fraction of "
                   "--decay-steps) or constant",
    "decay_steps": "step at which the decay reaches --min-lr, then held (default: --max-steps when the run starts; "
                   "saved with the checkpoints, so a larger --max-steps on resume does not stretch it; "
                   "LVM: 288000, configs/lvm-*.yaml)",
    "decay_fraction": "wsd: share of --decay-steps spent decaying",
    "weight_decay": "AdamW weight decay (not applied to norms)",
    "grad_clip": "gradient-norm clipping",
    "seed": "seed of the data order and the initialisation",
    "micro_batch": "windows per GPU per micro-step",
    "grad_accum": "micro-steps per optimizer step",
    "global_batch_tokens": "tokens per optimizer step; sets --grad-accum (exclusive with it)",
    "grad_ckpt": "activation (gradient) checkpointing",
    "precision": "auto (bf16 where supported, fp32 on CPU), bf16, fp16 (loss scaling) or fp32",
    "save_every": "checkpoint every N steps (and at the end)",
    "save_every_minutes": "also checkpoint when this many minutes passed since the last checkpoint (default: off)",
    "keep_last": "checkpoints kept",
    "eval_every": "validation every N steps (and at the end); 0 disables",
    "eval_max_sentences": "cap on validation sentences (default: all)",
    "log_every": "log every N steps",
    "resume": "auto (latest checkpoint in the run folder, if any), none, or a checkpoint path",
    "data_changed": "resuming on data that changed since the checkpoint (e.g. more shards): refuse, before any compute, "
                    "or continue: keep the step, optimizer and schedule and start a new epoch layout over the data as it "
                    "is now from the next window (logged in one line)",
    "packing": "concat: sentences concatenated and cut into windows; sentence: whole sentences best-fit, padded",
    "max_bad_steps": "stop after this many consecutive steps with a non-finite loss",
    "gpu_mem_gib": "GPU memory budget: the planner fills ds_config values left \"auto\"",
    "optimizer": "optimizer (AdamW and Lion via DeepSpeed; SGD with momentum; 8-bit AdamW via bitsandbytes)",
    "attention": "attention kernels: auto (flash-attention-2 where installed and on a GPU, else sdpa), flash_attention_2, "
                 "sdpa or eager; one that cannot run here falls back to sdpa with one log line",
    "kernels": "fused kernels: none, or liger (Liger-Kernel's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy; "
               "needs liger-kernel and a GPU, else one log line and none)",
    "compile": "torch.compile every decoder layer (the first steps include the compilation; the first forward says "
               "in one line whether the layers compiled or fell back to eager)",
}



CHOICES = {
    "packing": ("concat", "sentence"),
    "data_changed": ("refuse", "continue"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "attention": ("auto", "flash_attention_2", "sdpa", "eager"),
    "kernels": ("none", "liger"),
    "optimizer": tuple(OPTIMIZERS),
    "lr_schedule": tuple(SCHEDULES),
}
METAVARS = {"data": "PATH", "val_data": "PATH", "data_weights": "W"}
CONFIG_HELP = ("YAML run recipe: configs/lvm-{300m,600m,1b,3b,7b}.yaml (LVM's published settings) or a --print-config "
               "output; its keys are the option names below with underscores (seq_len: 4096) and its values count as "
               "given, like flags. Flags win over the file wherever they stand on the command line; of two --config "
               "files the later wins (default: none)")
PRINT_HELP = ("print the resolved run as YAML (values given by --config or flags as keys, every other value as a "
              "comment) and exit; --config takes it back (default: off)")


class OptionsError(ValueError):
    """A bad flag, recipe or value (one line; launch/pretrain.py exits 2)."""


def flag(name: str) -> str:
    """The command-line flag of a RunOptions field."""
    return "--ds_config" if name == "ds_config" else "--" + name.replace("_", "-")


def _types() -> dict:
    return typing.get_type_hints(RunOptions)


def _list_item(hint):
    """The item type of a list option (`list[str]`, `list[float] | None`), else None."""
    for t in (hint, *typing.get_args(hint)):
        if typing.get_origin(t) is list:
            return typing.get_args(t)[0]
    return None


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


class _HelpFormatter(DefaultHelpFormatter):
    """The help text as written (its default included once), without jsonargparse's type and default column."""

    def _get_help_string(self, action):
        return action.help or ""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Pretrain a LlamaForCausalLM on visual sentences with DeepSpeed.",
                       formatter_class=_HelpFormatter, exit_on_error=False, print_config=None, allow_abbrev=False,
                       env_prefix=False, default_env=False)
    p.add_argument("--config", action=ActionConfigFile, metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--print-config", dest="print_config", action="store_true", help=PRINT_HELP)
    defaults, types = RunOptions(), _types()
    for f in fields(RunOptions):
        default = getattr(defaults, f.name)
        text = HELP[f.name] if "default" in HELP[f.name] else f"{HELP[f.name]} (default: {_shown(default)})"  # shown once
        kw = {"dest": f.name, "default": default, "help": text.replace("%", "%%")}
        hint, item = types[f.name], _list_item(types[f.name])
        if hint is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif item is not None:
            p.add_argument(flag(f.name), type=item, nargs="+", metavar=METAVARS.get(f.name), **kw)
        elif f.name in CHOICES:
            p.add_argument(flag(f.name), type=typing.Literal[CHOICES[f.name]], **kw)
        else:
            p.add_argument(flag(f.name), type=hint, **kw)
    p.add_argument("--local_rank", "--local-rank", type=int | None, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def read_recipe(path: str) -> dict:
    """A --config file's values, checked: a mapping of known option names, lists where options take several."""
    where = f"--config {path}"
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise OptionsError(f"{where}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise OptionsError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    names = [f.name for f in fields(RunOptions)]
    if not isinstance(loaded, dict) or not loaded:
        raise OptionsError(f"{where}: a recipe maps option names to values (e.g. seq_len: 4096), got {type(loaded).__name__}")
    for key, value in loaded.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            raise OptionsError(f"{where}: unknown key {key!r}" + (f" (did you mean {near[0]}?)" if near else
                                                                 f"; the keys are {', '.join(names)}"))
        if _list_item(_types()[key]) is not None and value is not None and not isinstance(value, list):
            raise OptionsError(f"{where}: {key} takes a list, e.g. {key}: [{value}]")
    return loaded


def _describe(name: str) -> str:
    if name in CHOICES:
        return "one of " + ", ".join(CHOICES[name])
    hint = _types()[name]
    item = _list_item(hint)
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    text = f"a list of {words[item].split(' ', 1)[1]}s" if item is not None else words.get(
        next((t for t in (hint, *typing.get_args(hint)) if t in words), str), "a value")
    return text + (" or null" if type(None) in typing.get_args(hint) else "")


def _one_line(message: str) -> str:
    """jsonargparse's (often multi-line) message as one line naming the flag and the recipe key."""
    m = re.match(r'Parser key "(\w+)"', message)
    if m and m.group(1) in HELP:
        name = m.group(1)
        got = re.findall(r"(?:Got|Given) value: (.*)", message)
        return f"{flag(name)} ({name}): expected {_describe(name)}" + (f", got {got[-1]!r}" if got else "")
    return " ".join(message.split())


def _configs_first(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the --config arguments, in their order; everything else). jsonargparse applies arguments in order, so
    reading every recipe first is what makes a flag win wherever it stands."""
    configs, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            configs += argv[i:i + 2]
            i += 2
            continue
        (configs if argv[i].startswith("--config=") else rest).append(argv[i])
        i += 1
    return configs, rest


def check_weights(data: list[str], weights: list[float] | None) -> None:
    if weights is None:
        return
    if len(weights) != len(data):
        raise ValueError(f"--data-weights has {len(weights)} values for {len(data)} --data sources: give one weight per source")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"--data-weights must be positive numbers, got {bad[0]}")


def parse_command(argv=None) -> tuple[RunOptions, set[str], bool]:
    """(options, the names given by a flag or a --config file, whether --print-config was given)."""
    import sys

    configs, rest = _configs_first(list(sys.argv[1:] if argv is None else argv))
    for path in configs[1::2] + [a.split("=", 1)[1] for a in configs if a.startswith("--config=")]:
        read_recipe(path)
    try:
        ns = build_parser().parse_args(configs + rest, defaults=False)  # only what the command line and recipes set
    except argparse.ArgumentError as e:
        raise OptionsError(_one_line(str(e))) from None
    values = {k: v for k, v in ns.as_dict().items() if k in HELP}
    given = {k for k, v in values.items() if v is not None}
    opts = RunOptions(**{k: values[k] for k in given})
    if "grad_accum" in given and "global_batch_tokens" in given:
        raise ValueError("give --grad-accum or --global-batch-tokens, not both")
    for name in ("seq_len", "max_steps", "micro_batch", "grad_accum", "keep_last", "log_every", "max_bad_steps"):
        if getattr(opts, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if opts.seed < 0:
        raise ValueError("--seed must be >= 0")
    if opts.save_every_minutes is not None and not opts.save_every_minutes > 0:
        raise ValueError("--save-every-minutes must be > 0")
    check_weights(opts.data, opts.data_weights)
    if opts.resume not in ("auto", "none") and not opts.resume:
        raise ValueError("--resume must be auto, none or a checkpoint path")
    return opts, given, bool(ns.get("print_config"))


def parse_options(argv=None) -> tuple[RunOptions, set[str]]:
    """(options, names set explicitly by a flag or a --config file): those may not contradict the ds_config."""
    opts, given, _ = parse_command(argv)
    return opts, given


def resolved(opts: RunOptions, name: str):
    """The value the run uses for `name` where the option leaves it to be derived (run folder, schedule)."""
    if name == "output":
        return opts.run_dir()
    if name == "decay_steps" and opts.decay_steps is None:
        return opts.max_steps
    if name == "warmup_steps" and opts.warmup_steps is None:
        return default_warmup(opts.decay_steps if opts.decay_steps is not None else opts.max_steps)
    return getattr(opts, name)


def recipe_yaml(opts: RunOptions, given: set[str]) -> str:
    """The run as a --config file: given values as keys, every other value (derived ones resolved) commented."""
    def scalar(value) -> str:
        return yaml.safe_dump(value, width=10**9).split("\n...")[0].strip()

    def line(name, value) -> str:
        return f"{name}: " + (f"[{', '.join(map(scalar, value))}]" if isinstance(value, list) else scalar(value))

    out = ["# launch/pretrain.py --print-config: the resolved run. Keys are values given (by --config or flags);",
           "# commented lines are the defaults this run resolves to (uncommented, a value counts as given)."]
    for f in fields(RunOptions):
        if f.name in given:
            out.append(line(f.name, getattr(opts, f.name)))
        elif f.name == "grad_accum" and "global_batch_tokens" in given:
            out.append("# grad_accum: set at start to global_batch_tokens / (micro_batch x ranks x seq_len)")
        else:
            out.append("# " + line(f.name, resolved(opts, f.name)))
    return "\n".join(out) + "\n"
