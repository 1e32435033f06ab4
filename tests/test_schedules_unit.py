"""Schedules on their own (no Horovod): positions, values, errors, the plan/on_round protocol."""
import math

import pytest

from prsgd_hvd.schedules import (Adaptive, FixedInterval, Heterogeneous, Hierarchical, RoundReport,
                                 TimeVarying, WarmUp, as_schedule)


def bound(s, rank=0, size=2, local_size=None, allgather=None):
    s.bind(rank, size, allgather or (lambda obj: [obj] * size), local_size)
    return s


def run(s, steps, start=1, elapsed=0.0):
    """(t, average_before, average_after, lr) per step, reporting rounds like the optimizer."""
    out = []
    for t in range(start, start + steps):
        plan = s.plan(t, elapsed)
        assert s.plan(t, elapsed) == plan  # the question has no side effects
        if plan.averages:
            s.on_round(RoundReport(t=t, steps=1, agree=plan.agree))
        out.append((t, plan.average_before, plan.average_after, plan.lr))
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
        s.plan(7)


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
    # 2 of epoch 2's 4 steps are done: the epoch ends 2 steps after resuming (at t = 7).
    assert [after for _, _, after, _ in run(b, 2, start=6)] == [False, True] and b.epoch == 3


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
        s.plan(1)


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
    assert [s.plan(t).weight for t in range(1, 6)] == [1.0, 2.0, 3.0, 4.0, 5.0]


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
    assert isinstance(a, Heterogeneous) and a.mode == "by_speed"
    same, other = bound(Heterogeneous.by_speed(2), size=2), bound(Heterogeneous.by_speed(2), size=3)
    same.load_state_dict(a.state_dict())
    other.load_state_dict(a.state_dict())
    assert same.intervals == [4, 2] and other.intervals == [] and other.calibrating()
    # TimeVarying.paper takes N from the world it is bound to.
    two, four = bound(TimeVarying.paper(lr0=0.1, k0=8.0), size=2), bound(TimeVarying.paper(lr0=0.1, k0=8.0), size=4)
    assert (two.epoch_lengths(8), four.epoch_lengths(8)) == (8, 4)
    # Explicit per-rank counts cannot follow a resize, and say so.
    with pytest.raises(ValueError, match="2 entries but the process set has 3 ranks"):
        bound(Heterogeneous([1, 2]), size=3)


def test_warmup_wraps_any_schedule_and_epochs_start_after_it():
    s = bound(WarmUp(TimeVarying([2], repeat_last=True), 3))
    steps = run(s, 7)
    assert [t for t, b, _, _ in steps if b] == [1, 2, 3]
    assert [t for t, _, a, _ in steps if a] == [5, 7]  # epoch 1 is steps 4-5
    f = bound(WarmUp(FixedInterval(3), 1))
    assert [t for t, b, _, _ in run(f, 6) if b] == [1, 3, 6]
    a = bound(WarmUp(Adaptive(initial=4), 8))  # Adaptive starts counting after the warm-up
    assert [t for t, b, _, _ in run(a, 12) if b][-1] == 12


def test_by_speed_calibrates_from_round_reports_and_agrees_in_the_round():
    times = {0: 0.01, 1: 0.03}
    gathered = []

    def allgather(obj):
        gathered.append(obj)
        return [times[0], obj]  # rank 0 measured 10 ms per step; we are rank 1

    s = bound(Heterogeneous.by_speed(2, calibrate_steps=4), rank=1, allgather=allgather)
    last, epochs = 0, []
    for t in range(1, 6):
        plan = s.plan(t)
        if plan.average_after:
            timed = t - last - (1 if last == 0 else 0)  # the first step is not timed
            s.on_round(RoundReport(t=t, steps=t - last, compute_seconds=timed * times[1],
                                   agree=plan.agree))
            epochs.append(t - last)
            last = t
    assert epochs == [2, 2, 1]  # 4 timed steps in epochs of 2; the first step has no start
    assert gathered == [pytest.approx(0.03)] and s.intervals == [6, 2]
    assert not s.calibrating() and s.plan(6).agree is False


def test_finished_ranks_answer_the_agreement_without_moving():
    calls = []
    s = bound(Adaptive(initial=2), allgather=lambda obj: calls.append(obj) or [obj, (0.0, 0.9)])
    s.on_round(RoundReport(t=7, kind="join", agree=True))
    assert calls == [None] and s.interval == 2 and s.next_round == 2
    s.on_round(RoundReport(t=2, agree=True, compute_seconds=1.0, waited_seconds=1.0))
    assert s.interval == 4 and s.next_round == 6  # half the time waiting: double


def test_hierarchical_groups_by_host_and_all():
    s = bound(Hierarchical({2: "host", 8: "all"}), size=4, local_size=2)
    assert s.levels == [(2, 2), (8, 4)] and s.group_sizes() == [2]
    assert s.plan(2).group == 2 and s.plan(8).group is None and not s.plan(3).averages
    with pytest.raises(ValueError, match="group size 3"):
        bound(Hierarchical({2: "host", 8: "all"}), size=4, local_size=3)
    with pytest.raises(ValueError, match="group size"):
        Hierarchical({2: "rack"})


def test_time_varying_callables_are_told_apart():
    a, b = TimeVarying(lambda s: s), TimeVarying(lambda s: 2 * s)
    assert a.describe() != b.describe()
    assert TimeVarying(lambda s: s).describe() == a.describe()


@pytest.mark.parametrize("state", [{"epoch": -1, "epoch_start": 0}, {"epoch": 1, "epoch_start": 2.5},
                                   {"epoch": "3", "epoch_start": 0}])
def test_bad_positions_are_rejected(state):
    with pytest.raises(ValueError, match="schedule state"):
        bound(TimeVarying([2])).load_state_dict(state)


def test_a_custom_schedule_without_describe_is_compared_by_its_parameters():
    """The default describe() carries what the schedule was built with, so ranks that built
    it with different parameters disagree at construction instead of averaging apart (it
    used to return the class name only)."""
    from prsgd_hvd.schedules import Schedule, StepPlan

    class EveryK(Schedule):
        def __init__(self, k, note="x"):
            self.k, self.note, self._private = k, note, object()

        def plan(self, t, elapsed=0.0):
            return StepPlan(average_after=t % self.k == 0)

    class EveryKLater(EveryK):
        def __init__(self, k):
            super().__init__(k, note="later")
            self.offset = 1

    assert EveryK(3).describe() == {"schedule": "EveryK", "k": 3, "note": "x"}
    assert EveryK(3).describe() != EveryK(4).describe()
    assert EveryKLater(3).describe() == {"schedule": "EveryKLater", "k": 3, "note": "later",
                                         "offset": 1}
    s = EveryK(3)
    s.bind(1, 2, lambda obj: [obj, obj])  # bound attributes are not parameters
    assert s.describe() == EveryK(3).describe()
