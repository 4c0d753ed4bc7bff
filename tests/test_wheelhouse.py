"""launch/wheelhouse.py: which wheels an offline GPU machine gets, from its `pip freeze` and pip's resolution
report (the resolution itself needs an index and is not run here)."""

import importlib.util
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("wheelhouse", REPO / "launch" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)

ENV = wheelhouse.target_environment("3.12")


def item(name, version, *requires):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


def freeze(tmp_path, text):
    f = tmp_path / "freeze.txt"
    f.write_text(text)
    return wheelhouse.read_have(f)


def test_read_have_takes_pip_freeze_output(tmp_path):
    have = freeze(tmp_path, "# a comment\n-e git+https://x/y#egg=z\nTorch==2.11.0+cu130\nhuggingface_hub==1.33.0\n"
                            "pkg @ file:///wheels/pkg.whl\nnumpy\n")
    assert str(have["torch"]) == "2.11.0+cu130" and str(have["huggingface-hub"]) == "1.33.0"
    assert have["pkg"] is None and have["numpy"] is None


@pytest.mark.parametrize("text, why", [("numpy==2\n", "lists no torch"), ("torch==2.11\n??\n", ":2: not a 'name==version'"),
                                       ("torch==not.a.version!\n", "bad version")])
def test_read_have_refuses_bad_input(tmp_path, text, why):
    with pytest.raises(wheelhouse.UserError, match=why.replace("?", r"\?")):
        freeze(tmp_path, text)


def test_carries_what_is_missing_or_too_old_and_keeps_the_rest(tmp_path):
    have = freeze(tmp_path, "torch==2.11.0\nhuggingface-hub==1.33.0\nnumpy==2.5.2\ntokenizers==0.23.2\nfilelock\n")
    report = {"install": [
        item("transformers", "5.24.0", "huggingface-hub>=1.0", "tokenizers>=0.22", "numpy>=1.17", "torch>=2.2; extra == 'torch'"),
        item("huggingface_hub", "2.4.0", "httpx2>=2", "filelock"),  # resolved newer, but the kept 1.33 is enough
        item("httpx2", "2.16.2"),  # needed only by the huggingface-hub that is not carried
        item("deepspeed", "0.19.8", "torch", "hjson", "pydantic>=2.0.0", "numpy"),
        item("hjson", "3.1.0"),
        item("pydantic", "2.14.4", "pydantic-core==2.50.5"),
        item("pydantic-core", "2.50.5", "typing-extensions>=4.14; python_version < '3.13'"),
        item("typing-extensions", "4.16.0"),
        item("torch", "2.14.0", "triton==3.8.0; platform_system == 'Linux'"),
        item("triton", "3.8.0"),
        item("numpy", "2.4.6"),
        item("tokenizers", "0.23.3"),
    ]}
    ours = [Requirement(r) for r in ("torch>=2.13", "transformers>=5.23", "deepspeed>=0.19.8", "numpy")]
    carry, kept, warnings = wheelhouse.choose(report, ours, have, ENV)
    assert {n: why for n, _, why in carry} == {
        "transformers": "missing", "deepspeed": "missing", "hjson": "missing", "pydantic": "missing",
        "pydantic-core": "missing", "typing-extensions": "missing"}
    assert dict(kept) == {"torch": "2.11.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "tokenizers": "0.23.2"}
    assert len(warnings) == 1 and warnings[0].startswith("torch 2.11.0 on the GPU machine does not meet >=2.13")


def test_a_carried_package_can_raise_the_bar_for_a_kept_one(tmp_path):
    # the GPU machine's transformers is too old; the carried one needs a newer hub than the one it has
    have = freeze(tmp_path, "torch==2.11.0\ntransformers==5.17.0\nhuggingface-hub==1.33.0\n")
    report = {"install": [item("transformers", "5.24.0", "huggingface-hub>=2.0"), item("huggingface-hub", "2.4.0", "httpx2"),
                          item("httpx2", "2.16.2")]}
    carry, kept, _ = wheelhouse.choose(report, [Requirement("transformers>=5.23")], have, ENV)
    assert {n: why for n, _, why in carry} == {"transformers": "has 5.17.0, needs >=5.23",
                                               "huggingface-hub": "has 1.33.0, needs >=2.0", "httpx2": "missing"}
    assert [n for n, _ in kept] == []


def test_the_gpu_extra_is_in_setup_cfg():
    names = {r.name for r in wheelhouse.project_requirements(REPO / "setup.cfg", ["gpu"])}
    assert {"torch", "deepspeed", "transformers", "liger-kernel"} <= names
    with pytest.raises(wheelhouse.UserError, match="no extra 'nope'"):
        wheelhouse.project_requirements(REPO / "setup.cfg", ["nope"])


def test_cli_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "launch/wheelhouse.py", "--have", str(tmp_path / "none.txt")], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: --have ")
