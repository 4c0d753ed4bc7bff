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
