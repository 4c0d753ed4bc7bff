import math

import pytest

from lvm.train.schedule import Schedule, ScheduleError, lr_at


def test_cosine_decays_over_decay_steps_then_holds():
    s = Schedule("cosine", 1.0, 0.1, warmup=10, decay_steps=110).check()
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(110) == s.lr_at(10_000) == pytest.approx(0.1)
    # LVM: cosine over 288k of 400k steps, the rest at min_lr
    lvm = Schedule("cosine", 1.5e-4, 3e-5, 8000, 288_000).check()
    assert lvm.lr_at(288_000) == lvm.lr_at(399_999) == pytest.approx(3e-5)


def test_a_longer_run_does_not_move_the_steps_already_taken():
    short = Schedule("cosine", 1.0, 0.0, 5, decay_steps=100)
    assert [short.lr_at(k) for k in range(100)] == [lr_at(k, 1.0, 0.0, 5, 100) for k in range(100)]
    # the schedule is set in steps: raising max_steps (not decay_steps) continues at min_lr
    assert [short.lr_at(k) for k in range(150)][:100] == [short.lr_at(k) for k in range(100)]


def test_wsd_is_stable_then_decays_linearly():
    s = Schedule("wsd", 1.0, 0.0, warmup=10, decay_steps=100, decay_fraction=0.2).check()
    assert s.decay_start == 80
    assert all(s.lr_at(k) == 1.0 for k in range(10, 81))
    assert s.lr_at(90) == pytest.approx(0.5) and s.lr_at(100) == 0.0


def test_constant_after_warmup():
    s = Schedule("constant", 2.0, 0.0, warmup=4, decay_steps=1).check()
    assert [s.lr_at(k) for k in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


@pytest.mark.parametrize("kw, msg", [
    (dict(kind="cosine", warmup=8000, decay_steps=1000), "must end before the decay"),
    (dict(kind="wsd", warmup=90, decay_steps=100, decay_fraction=0.5), "inside the warmup"),
    (dict(kind="wsd", warmup=1, decay_steps=100, decay_fraction=0), "decay-fraction"),
    (dict(kind="linear"), "must be one of"),
    (dict(kind="cosine", peak=1e-4, min_lr=1e-3), "min-lr"),
])
def test_schedules_that_cannot_work_are_refused(kw, msg):
    with pytest.raises(ScheduleError, match=msg):
        Schedule(**kw).check()


def opts_of(*argv):
    from lvm.train.options import parse_options

    return parse_options(list(argv))


def test_a_new_run_decays_at_max_steps_and_its_default_warmup_fits():
    from lvm.train.schedule import run_schedule

    opts, given = opts_of()  # every default: 1000 steps
    s = run_schedule(opts, given)
    assert (s.kind, s.decay_steps, s.warmup) == ("cosine", 1000, 100)  # LVM's 8000 capped at a tenth
    opts, given = opts_of("--max-steps", "400000", "--decay-steps", "288000")  # LVM
    assert (run_schedule(opts, given).warmup, run_schedule(opts, given).decay_steps) == (8000, 288000)
    with pytest.raises(ScheduleError, match="--warmup-steps 8000 must end before the decay does at step 1000"):
        run_schedule(*opts_of("--warmup-steps", "8000"))
    with pytest.raises(ScheduleError, match="--warmup-steps 2 must end before the decay does at step 1"):
        run_schedule(*opts_of("--warmup-steps", "2", "--max-steps", "1"))
    assert run_schedule(*opts_of("--max-steps", "1")).warmup == 0  # a smoke test: leave the warmup to the default


def test_a_resumed_run_keeps_its_schedule():
    from lvm.train.schedule import run_schedule

    saved = Schedule("cosine", 1e-3, 1e-4, 10, 100).as_dict()
    opts, given = opts_of("--max-steps", "150", "--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "10")
    assert run_schedule(opts, given, saved, step=60) == Schedule(**saved)  # more steps: the decay stays at 100
    with pytest.raises(ScheduleError, match=r"--decay-steps 150 would change the learning rate of step 12 "):
        run_schedule(*opts_of("--max-steps", "150", "--decay-steps", "150"), saved, step=60)
    with pytest.raises(ScheduleError, match="--lr 0.002 would change"):
        run_schedule(*opts_of("--lr", "2e-3"), saved, step=60)
    # WSD: moving a decay that has not started yet is the point of WSD
    wsd = Schedule("wsd", 1e-3, 0.0, 10, 1000, 0.1).as_dict()
    s = run_schedule(*opts_of("--max-steps", "2000", "--decay-steps", "2000"), wsd, step=800)
    assert s.decay_steps == 2000 and s.decay_start == 1800
    with pytest.raises(ScheduleError, match="would change the learning rate of step 902"):
        run_schedule(*opts_of("--max-steps", "2000", "--decay-steps", "2000"), wsd, step=950)
    # a resumed run may raise the decay of a short run whose decay was over: the steps taken keep their rates
    short = Schedule("cosine", 1e-3, 1e-4, 2, 4).as_dict()
    with pytest.raises(ScheduleError, match="--decay-steps 50 would change the learning rate of step 4"):
        run_schedule(*opts_of("--max-steps", "50", "--decay-steps", "50"), short, step=4)
    assert run_schedule(*opts_of("--max-steps", "50", "--decay-steps", "50"), short, step=2).decay_steps == 50


def test_raising_max_steps_on_resume_keeps_the_steps_taken(train_shards, tmp_path):
    from tests.train.conftest import base_args, read_metrics
    from tests.train.one_rank import run_train_any as run_train

    run = tmp_path / "run"
    args = base_args(train_shards, run, "--ds_config", "ds_configs/zero2.json", "--lr-schedule", "wsd", "--decay-fraction",
                     "0.5", "--warmup-steps", "1", "--max-steps", "4", "--save-every", "4")
    run_train(1, args)
    first = read_metrics(run)
    r = run_train(1, [*args, "--max-steps", "6"])  # the job, given more steps
    assert "schedule wsd: 1 warmup steps to 0.003, stable until step 2, linear decay to 0.0003 at step 4" in r.stdout
    m = read_metrics(run)
    want = Schedule("wsd", 3e-3, 3e-4, 1, 4, 0.5)
    assert [m[s]["lr"] for s in range(1, 7)] == pytest.approx([want.lr_at(k) for k in range(6)], rel=1e-12)
    assert [first[s]["lr"] for s in range(1, 5)] == [m[s]["lr"] for s in range(1, 5)]
    assert m[5]["lr"] == m[6]["lr"] == pytest.approx(3e-4)
