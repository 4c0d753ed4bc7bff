"""Run recipes (configs/lvm-*.yaml), --config precedence, --print-config, and what a recipe value counts as."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lvm.model.presets import PRESETS, count_parameters, llama_config
from lvm.train.ds_config import ConfigError, resolve
from lvm.train.options import OptionsError, parse_command, parse_options, recipe_yaml
from lvm.train.schedule import Schedule, ScheduleError, run_schedule

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs").glob("lvm-*.yaml"))
NOMINAL = {"300m": 0.3e9, "600m": 0.6e9, "1b": 1e9, "3b": 3e9, "7b": 7e9}


def pretrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/pretrain.py", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    return lines[0]


def test_a_recipe_for_each_paper_size():
    assert [p.stem for p in RECIPES] == ["lvm-1b", "lvm-300m", "lvm-3b", "lvm-600m", "lvm-7b"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_names_an_existing_preset(path):
    size = path.stem.removeprefix("lvm-")
    opts, given = parse_options(["--config", str(path)])
    assert opts.model == size and opts.model in PRESETS
    n = count_parameters(llama_config(opts.model, opts.seq_len))
    assert 0.6 < n / NOMINAL[size] < 1.6, n
    assert opts.seq_len == 4096 and opts.global_batch_tokens == 32 * 4 * 4096
    assert (opts.lr, opts.min_lr, opts.warmup_steps, opts.decay_steps) == (1.5e-4, 3e-5, 8000, 288000)
    assert (opts.optimizer, opts.lr_schedule, opts.weight_decay, opts.grad_clip) == ("adamw", "cosine", 0.1, 1.0)
    assert opts.max_steps == (100_000 if size == "7b" else 801_086)
    run_schedule(opts, given)  # a schedule the trainer accepts
    head = path.read_text().split("\n\n", 1)[0]
    assert "github.com/ytongbai/LVM" in head and "arXiv:2312.00785" in head  # sources cited at the top
    assert set(yaml.safe_load(path.read_text())) == given


def test_print_config_prints_lvm_1b_and_a_later_flag_wins():
    r = pretrain("--config", "configs/lvm-1b.yaml", "--max-steps", "50", "--print-config")
    assert r.returncode == 0, r.stderr[-2000:]
    run = yaml.safe_load(r.stdout)
    assert run["model"] == "1b" and run["seq_len"] == 4096 and run["lr"] == 1.5e-4 and run["min_lr"] == 3e-5
    assert run["warmup_steps"] == 8000 and run["decay_steps"] == 288000 and run["global_batch_tokens"] == 524288
    assert run["max_steps"] == 50
    assert "# output: runs/1b-s4096" in r.stdout.splitlines()  # the rest resolved, as comments


def test_print_config_round_trip(tmp_path):
    argv = ["--config", str(REPO / "configs/lvm-3b.yaml"), "--max-steps", "50", "--data", "a", "b",
            "--data-weights", "2", "1", "--grad-ckpt", "--output", "runs/x y", "--resume", "null"]
    opts, given, show = parse_command([*argv, "--print-config"])
    assert show
    text = recipe_yaml(opts, given)
    f = tmp_path / "run.yaml"
    f.write_text(text)
    again, again_given, show = parse_command(["--config", str(f)])
    assert not show
    assert (again, again_given) == (opts, given)  # the same run, the same values given
    assert recipe_yaml(again, again_given) == text
    assert opts.resume == "null" and opts.output == "runs/x y"  # strings YAML would read otherwise stay strings


def test_defaults_round_trip(tmp_path):
    opts, given = parse_options([])
    assert given == set()
    f = tmp_path / "run.yaml"
    f.write_text(recipe_yaml(opts, given) + "seed: 0\n")  # every line a comment: one key to make it a mapping
    assert parse_options(["--config", str(f)]) == (opts, {"seed"})


@pytest.mark.parametrize("argv", [
    ["--config", "configs/lvm-1b.yaml", "--lr", "1e-3"],
    ["--lr", "1e-3", "--config", "configs/lvm-1b.yaml"],
    ["--lr=1e-3", "--config=configs/lvm-1b.yaml"],
], ids=["flag-after", "flag-before", "equals-form"])
def test_flags_win_wherever_they_stand(argv):
    opts, given = parse_options([a.replace("configs/", f"{REPO}/configs/") for a in argv])
    assert opts.lr == 1e-3 and opts.min_lr == 3e-5 and {"lr", "min_lr"} <= given


def test_a_later_config_wins_over_an_earlier_one(tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text("max_steps: 20\nmicro_batch: 2\n")
    opts, given = parse_options(["--config", str(REPO / "configs/lvm-1b.yaml"), "--config", str(small)])
    assert (opts.model, opts.max_steps, opts.micro_batch) == ("1b", 20, 2)
    opts, _ = parse_options(["--config", str(small), "--config", str(REPO / "configs/lvm-1b.yaml")])
    assert (opts.max_steps, opts.micro_batch) == (801_086, 2)
    opts, _ = parse_options(["--max-steps", "7", "--config", str(small), "--config", str(REPO / "configs/lvm-1b.yaml")])
    assert opts.max_steps == 7


def test_a_recipe_value_counts_as_given(tmp_path):
    """Like a flag, it must agree with a concrete ds_config value, and on resume it is checked against the
    checkpoint's schedule (it may not rewrite the learning rate of steps already taken)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("grad_clip: 1.0\nlr: 1.0e-3\nseq_len: 256\n")
    opts, given = parse_options(["--config", str(recipe)])
    assert {"grad_clip", "lr", "seq_len"} <= given
    ds = json.loads((REPO / "ds_configs/zero2.json").read_text())
    ds["gradient_clipping"] = 0.5
    with pytest.raises(ConfigError, match="gradient_clipping"):
        resolve(ds, opts, given, 1, __import__("torch").device("cpu"))
    unset, unset_given = parse_options(["--seq-len", "256"])
    assert resolve(ds, unset, unset_given, 1, __import__("torch").device("cpu"))["gradient_clipping"] == 0.5
    saved = Schedule("cosine", 3e-3, 3e-4, 2, 100).as_dict()
    with pytest.raises(ScheduleError, match="--lr"):
        run_schedule(opts, given, saved, step=10)
    assert run_schedule(unset, unset_given, saved, step=10).peak == 3e-3  # not given: the checkpoint's schedule


def test_launcher_arguments_are_accepted():
    for argv in (["--local_rank=3"], ["--local-rank", "0"], ["--local_rank", "1", "--ds_config", "ds_configs/zero2.json"]):
        opts, given = parse_options(argv)
        assert "local_rank" not in given
    assert parse_options(["--local_rank=0", "--ds_config", "x.json"])[0].ds_config == "x.json"


@pytest.mark.parametrize("text,expect", [
    ("seq_lne: 128\n", "unknown key 'seq_lne' (did you mean seq_len?)"),
    ("local_rank: 0\n", "unknown key 'local_rank'"),
    ("seq_len: abc\n", "--seq-len (seq_len): expected an integer, got 'abc'"),
    ("packing: best\n", "--packing (packing): expected one of concat, sentence"),
    ("data: data/laion\n", "data takes a list, e.g. data: [data/laion]"),
    ("- 1\n- 2\n", "a recipe maps option names to values"),
    ("", "a recipe maps option names to values"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_recipe_is_one_error_line(tmp_path, text, expect):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(OptionsError) as e:
        parse_options(["--config", str(f)])
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_bad_config_key_exits_2_with_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: 1b\nlearning_rate: 1.0e-3\n")
    err = one_line_error(pretrain("--config", str(f), "--print-config"))
    assert str(f) in err and "learning_rate" in err
    err = one_line_error(pretrain("--config", str(tmp_path / "missing.yaml")))
    assert "missing.yaml" in err
    err = one_line_error(pretrain("--warmup-steps", "soon"))
    assert "--warmup-steps" in err and "soon" in err
    assert "--bogus" in one_line_error(pretrain("--bogus"))
