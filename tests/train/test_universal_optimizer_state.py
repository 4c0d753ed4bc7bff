"""After a universal-checkpoint resume (another world size), torch's AdamW finds every state tensor where and
in the dtype it would have made it (`_init_group`): fused, `step` is a float32 tensor on the parameter's device;
otherwise a float32 scalar on the CPU; the moments on the parameter's device.

Real DeepSpeed on CPU (gloo, one process, `universal_resume_worker.py`). DeepSpeed's universal loader gives
`step` back as a CPU tensor, which on a GPU the fused kernel cannot read; here the parameters are moved to the
meta device in its place ("device" below), on the real loaded state.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import ENV, REPO, free_port

WORKER = str(Path(__file__).with_name("universal_resume_worker.py"))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> dict:
    cases = [{"stage": 2, "fused": True}, {"stage": 2, "fused": False}, {"stage": 3, "fused": True}]
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    r = subprocess.run([sys.executable, WORKER, json.dumps(cases), str(tmp_path_factory.mktemp("uc"))],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    rows = [json.loads(x.removeprefix("RESULT ")) for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    return {(c["stage"], c["fused"]): c for c in rows}


@pytest.mark.parametrize("stage, fused", [(2, True), (2, False), (3, True)])
def test_state_is_where_torch_adamw_expects_it(resumed, stage, fused):
    case = resumed[(stage, fused)]
    real, device = case["real"], case["device"]
    assert real["optimizer"] == "AdamW" and real["states"] and all(s["fused"] == fused for s in real["states"])
    assert real["loss_after"] == pytest.approx(real["loss_after"])  # the resumed run stepped (a finite loss)
    assert real["distinct_steps"] and device["distinct_steps"]  # each partition counts its own steps
    for s in real["states"]:
        assert s["step"] == ["cpu", "float32"] and s["exp_avg"] == s["exp_avg_sq"] == ["cpu", "float32"], s
    for s in device["states"]:
        assert s["param"] == "meta"
        assert s["exp_avg"] == s["exp_avg_sq"] == ["meta", "float32"], s
        assert s["step"] == (["meta", "float32"] if fused else ["cpu", "float32"]), s
