import json

import pytest

from lvm.train.checkpoint import CheckpointError, check_run_identity


def identity(version: str, hidden: int = 64, seq: int = 256) -> dict:
    return {"world_size": 2, "zero_stage": 2, "seq_len": seq, "packing": "concat",
            "model": {"hidden_size": hidden, "transformers_version": version}}


def test_a_library_upgrade_is_not_another_run(tmp_path):
    check_run_identity(tmp_path, identity("4.50.0"), write=True)
    assert "transformers_version" not in json.loads((tmp_path / "run.json").read_text())["model"]
    check_run_identity(tmp_path, identity("5.1.0"), write=False)  # accepted


@pytest.mark.parametrize("other", [identity("4.50.0", hidden=128), identity("4.50.0", seq=512)])
def test_another_model_or_seq_len_is_refused(tmp_path, other):
    check_run_identity(tmp_path, identity("4.50.0"), write=True)
    with pytest.raises(CheckpointError, match="another run"):
        check_run_identity(tmp_path, other, write=False)
