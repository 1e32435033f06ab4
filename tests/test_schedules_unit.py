"""Schedules on their own (no Horovod): positions, values, errors."""
import math

import pytest

from prsgd_hvd.schedules import FixedInterval, Heterogeneous, TimeVarying, as_schedule


def bound(s, rank=0, size=2):
    s.bind(rank, size, allgather=lambda obj: [obj] * size)
    return s


def run(s, steps):
    """(t, average_before, average_after, lr) per step, calling round_done like the optimizer."""
    out = []
    for t in range(1, steps + 1):
        plan = s.before_step(t)
        if plan.average_before:
            s.round_done()
        after = s.after_step(t)
        if after:
            s.round_done()
        out.append((t, plan.average_before, after, plan.lr))
    return out


def test_fixed_interval_averages_before_at_multiples():
    assert [t for t, b, a, _ in run(bound(FixedInterval(3)), 10) if b] == [3, 6, 9]
    assert as_schedule(5).interval == 5


def test_time_varying_epochs_lrs_and_running_out():
    s = bound(TimeVarying([1, 3, 2], [0.1, 0.05, 0.01]))
    steps = run(s, 6)
    assert [t for t, _, a, _ in steps if a] == [1, 4, 6]
    assert [(t, lr) for t, _, _, lr in steps if lr is not None] == [(1, 0.1), (2, 0.05), (5, 0.01)]
    with pytest.raises(IndexError, match="epoch_lengths.*3 entries.*epoch 4.*repeat_last"):
        s.before_step(7)


def test_time_varying_repeat_last_and_callables():
    s = bound(TimeVarying([2], repeat_last=True))
    assert [t for t, _, a, _ in run(s, 6) if a] == [2, 4, 6]
    s = bound(TimeVarying(lambda k: k, lambda k: 1.0 / k))
    steps = run(s, 6)
    assert [t for t, _, a, _ in steps if a] == [1, 3, 6]
    assert [lr for *_, lr in steps if lr is not None] == [1.0, 0.5, pytest.approx(1 / 3)]


def test_time_varying_state_dict_resumes_mid_epoch():
    a = bound(TimeVarying([3, 4]))
    run(a, 5)
    b = bound(TimeVarying([3, 4]))
    b.load_state_dict(a.state_dict())
    # 2 of epoch 2's 4 steps are done: the epoch ends 2 steps after resuming.
    assert [after for _, _, after, _ in run(b, 2)] == [False, True] and b.epoch == 3


@pytest.mark.parametrize("bad,match", [
    (([0, 2],), "epoch_lengths.*ints >= 1.*epoch 1"),
    (([2, 1.5],), "epoch_lengths"),
    (([],), "empty"),
    (([2], [0.1, -1.0]), "lrs.*>= 0.*epoch 2"),
    (([2], [float("nan")]), "lrs"),
])
def test_time_varying_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        TimeVarying(*bad)


def test_time_varying_callable_bad_value_is_caught_when_used():
    s = bound(TimeVarying(lambda k: 0))
    with pytest.raises(ValueError, match="epoch 1 got 0"):
        s.before_step(1)


def test_time_varying_paper_schedule():
    s = bound(TimeVarying.paper(lr0=0.1, k0=8.0, lr_max=0.15), size=2)
    for k in (1, 8, 27, 64):
        assert s.epoch_lengths(k) == max(1, math.floor(8.0 * k ** (1 / 3) / 2))
        assert s.lrs(k) == pytest.approx(min(0.15, 0.1 * 2 / k ** (2 / 3)))
    s = bound(TimeVarying.paper(lr0=0.1, n_workers=4), size=2)
    assert s.epoch_lengths(1) == 1 and s.lrs(8) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr0"):
        TimeVarying.paper(lr0=0)


def test_heterogeneous_counts_per_rank_and_weights():
    s = bound(Heterogeneous([2, 5]), rank=1)
    assert [t for t, _, a, _ in run(s, 10) if a] == [5, 10]
    s = bound(Heterogeneous([2, 5], weights="steps"), rank=1)
    for t in range(1, 4):
        s.before_step(t)
        s.after_step(t)
    assert s.round_weight() == 3.0


def test_heterogeneous_errors():
    with pytest.raises(ValueError, match="3 entries.*2 ranks"):
        bound(Heterogeneous([1, 2, 3]), size=2)
    with pytest.raises(ValueError, match="intervals"):
        Heterogeneous([1, 0])
    with pytest.raises(TypeError, match="intervals"):
        Heterogeneous(3)
    with pytest.raises(ValueError, match="weights"):
        Heterogeneous([1, 2], weights="fednova")
    with pytest.raises(ValueError, match="seconds"):
        Heterogeneous.every_seconds(0)
    with pytest.raises(ValueError, match="base_interval"):
        Heterogeneous.by_speed(0)


def test_checkpoints_across_world_sizes_re_derive_what_depends_on_n():
    # by_speed: calibrated counts are kept on the same world size, recalibrated on another.
    a = bound(Heterogeneous.by_speed(2), size=2)
    a.intervals = [4, 2]
    same, other = bound(Heterogeneous.by_speed(2), size=2), bound(Heterogeneous.by_speed(2), size=3)
    same.load_state_dict(a.state_dict())
    other.load_state_dict(a.state_dict())
    assert same.intervals == [4, 2] and other.intervals == [] and other._calibrating()
    # TimeVarying.paper takes N from the world it is bound to.
    two, four = bound(TimeVarying.paper(lr0=0.1, k0=8.0), size=2), bound(TimeVarying.paper(lr0=0.1, k0=8.0), size=4)
    assert (two.epoch_lengths(8), four.epoch_lengths(8)) == (8, 4)
    # Explicit per-rank counts cannot follow a resize, and say so.
    with pytest.raises(ValueError, match="2 entries but the process set has 3 ranks"):
        bound(Heterogeneous([1, 2]), size=3)
