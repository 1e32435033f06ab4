"""When to average: the schedules accepted by ``DistributedLocalSGD(interval=...)``.

A schedule answers one question, without side effects: ``plan(t, elapsed)`` -> :class:`StepPlan`
for the ``step()`` call t = 1, 2, ... on this rank (``elapsed``: seconds since this rank's last
scheduled round ended, or since its first step began). The optimizer asks it at the start of
step t, and -- to start step t's round early (overlap) -- once more at the end of step t-1; both
get the same answer about the round because nothing changed in between. The schedule hears back
through one call, ``on_round(report)``, after every round it asked for (and after warm-up rounds).

    average_before   x_i <- avg(x^{t-1}), then the update from this step's gradient (Algorithm 1)
    average_after    the update, then x_i <- avg(x^t): an epoch ends (Algorithms 2 and 3)
    group            the round is among groups of this many consecutive ranks (Hierarchical)
    weight           this rank's weight in the round's average (1.0: the plain mean)
    lr               set on every param group before the update
    agree            after the round, the schedule agrees on measured values with the other ranks
                     (``on_round`` gets ``report.agree`` and calls ``self.allgather`` once)

NOTE: [schedules are deterministic per rank]
Every rank must reach the same averaging rounds in the same order, because each round is a
collective. A schedule therefore decides from its own counters, from values every rank agreed on
(``describe()`` is compared across ranks at construction; ``by_speed`` and ``Adaptive`` agree on
measurements with ``allgather``), or -- only for ``Heterogeneous.every_seconds`` -- from a clock
whose epochs all ranks start together at the end of a round. Ranks with different step counts per
epoch still meet: every rank joins every round, whatever its count. Agreement rides on the round:
the rank that asks for it says so in the round's control record, so a rank that has already
finished (in ``finalize()``) learns from the same round that it must answer the allgather too.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from .checks import int_at_least, is_int

__all__ = ["Schedule", "StepPlan", "RoundReport", "FixedInterval", "TimeVarying", "Heterogeneous",
           "Hierarchical", "Adaptive", "WarmUp", "as_schedule"]

ValueSpec = Union[Sequence[float], Callable[[int], float]]


@dataclass(frozen=True)
class StepPlan:
    """What ``step()`` t does besides the optimizer's own update (see the module doc)."""

    average_before: bool = False
    average_after: bool = False
    group: Optional[int] = None
    weight: float = 1.0
    lr: Optional[float] = None
    agree: bool = False
    warmup: bool = False    # a warm-up round (WarmUp): update rules keep it a plain average

    @property
    def averages(self) -> bool:
        return self.average_before or self.average_after


NO_ACTION = StepPlan()
AVERAGE_BEFORE = StepPlan(average_before=True)
WARMUP_ROUND = StepPlan(average_before=True, warmup=True)


@dataclass(frozen=True)
class RoundReport:
    """What a schedule hears after a round (``Schedule.on_round``).

    ``kind`` is ``"scheduled"`` (a round this schedule asked for), ``"warmup"`` (a warm-up round,
    see :class:`WarmUp`) or ``"join"`` (this rank has finished and is only answering the others'
    round: it must take part in the agreement when ``agree`` is set, and change nothing else).
    """

    t: int                    # the step the round belonged to
    kind: str = "scheduled"
    steps: int = 0            # local steps since the previous scheduled round
    compute_seconds: float = 0.0  # time since the previous scheduled round, minus waiting
    waited_seconds: float = 0.0   # time this rank waited for this round
    divergence: Optional[float] = None  # ||x_i - avg||^2 measured at this round
    agree: bool = False       # some rank asked for the schedule's agreement after this round

    @property
    def finished(self) -> bool:
        return self.kind == "join"


class Schedule:
    """Base class. Subclasses override ``plan`` (and ``on_round`` when they keep a position,
    which then goes into ``state_dict`` so that a resumed run averages at the same steps)."""

    rank = 0
    size = 1

    def __init_subclass__(cls, **kwargs):
        # Remember the parameters a schedule was built with (its public plain-data attributes
        # right after __init__), so that the default describe() compares them across ranks
        # and a subclass that does not override describe() cannot pass the agreement check
        # with different parameters on different ranks.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            init(self, *args, **kw)
            if type(self).__init__ is __init__:  # the outermost __init__ has finished
                self._built_with = _plain_attributes(self)

        cls.__init__ = __init__

    def bind(self, rank: int, size: int, allgather: Callable[[Any], List[Any]],
             local_size: Optional[int] = None) -> None:
        """Called by the optimizer when it is built (and after an elastic resize): this rank,
        the number of ranks, a collective ``allgather(obj) -> [obj of rank 0, ...]`` over the
        optimizer's process set, and how many ranks share this rank's host."""
        self.rank, self.size, self.allgather = rank, size, allgather
        self.local_size = local_size

    def plan(self, t: int, elapsed: float = 0.0) -> StepPlan:
        return NO_ACTION

    def on_round(self, report: RoundReport) -> None:
        """Called after every round this schedule asked for (see :class:`RoundReport`)."""

    def group_sizes(self) -> List[int]:
        """Sizes of the rank groups this schedule averages within, besides the whole set."""
        return []

    def describe(self) -> Dict[str, Any]:
        """What every rank must agree on (compared across ranks at construction). By default
        the class and the parameters it was built with (public attributes holding numbers,
        strings or lists of them); override it when that is not the right comparison."""
        return {"schedule": type(self).__name__, **getattr(self, "_built_with", {})}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:  # a position saved by another kind of schedule
            raise ValueError(f"schedule state: {type(self).__name__} keeps no position, but the "
                             f"checkpoint has {sorted(state)}; it was saved with another schedule")


_PLAIN = (int, float, str, bool, type(None))


def _plain_attributes(obj) -> Dict[str, Any]:
    out = {}
    for k, v in vars(obj).items():
        if k.startswith("_"):
            continue
        if isinstance(v, _PLAIN):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, _PLAIN) for x in v):
            out[k] = list(v)
    return out


def _positive_int(value: Any, what: str) -> int:
    return int_at_least(value, 1, what)


def _count(state: Dict[str, Any], key: str, minimum: int = 0) -> int:
    """A counter from a checkpoint: an int (or integral float) >= minimum, or a clear error."""
    if key not in state:
        raise ValueError(f"schedule state: '{key}' is missing; the checkpoint was saved with "
                         f"another schedule")
    v = state[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < minimum:
        raise ValueError(f"schedule state: '{key}' must be an integer >= {minimum}, got {v!r}")
    return int(v)


class FixedInterval(Schedule):
    """Algorithm 1: average every ``interval`` steps (at t = I, 2I, ...), before the update."""

    def __init__(self, interval: int):
        self.interval = _positive_int(interval, "FixedInterval: 'interval'")

    def plan(self, t: int, elapsed: float = 0.0) -> StepPlan:
        return AVERAGE_BEFORE if t % self.interval == 0 else NO_ACTION

    def describe(self) -> Dict[str, Any]:
        return {"schedule": "FixedInterval", "interval": self.interval}

    def __repr__(self) -> str:
        return f"FixedInterval({self.interval})"


class WarmUp(Schedule):
    """Average at every step for ``t <= steps`` (post-local-SGD warm-up), then follow ``inner``.

    ``DistributedLocalSGD(warmup_steps=W)`` wraps its schedule in this. Warm-up rounds reach the
    inner schedule as ``kind="warmup"`` reports, so epoch schedules start their first epoch after
    the warm-up."""

    def __init__(self, inner: Schedule, steps: int):
        self.inner, self.steps = inner, steps

    def bind(self, rank, size, allgather, local_size=None) -> None:
        super().bind(rank, size, allgather, local_size)
        self.inner.bind(rank, size, allgather, local_size)

    def plan(self, t: int, elapsed: float = 0.0) -> StepPlan:
        return WARMUP_ROUND if t <= self.steps else self.inner.plan(t, elapsed)

    def on_round(self, report: RoundReport) -> None:
        if report.t <= self.steps and report.kind == "scheduled":
            report = dataclasses.replace(report, kind="warmup")
        self.inner.on_round(report)

    def group_sizes(self) -> List[int]:
        return self.inner.group_sizes()

    def describe(self) -> Dict[str, Any]:
        return {**self.inner.describe(), "warmup_steps": self.steps}

    def state_dict(self) -> Dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def __repr__(self) -> str:
        return repr(self.inner)


class _Sequence:
    """``s -> value`` for s = 1, 2, ... from a sequence or a callable, validated on use."""

    def __init__(self, spec: ValueSpec, what: str, repeat_last: bool, check: Callable[[Any], bool],
                 requirement: str):
        if not callable(spec):
            spec = list(spec)
            if not spec:
                raise ValueError(f"TimeVarying: '{what}' is empty")
            for s, v in enumerate(spec, 1):
                if not check(v):
                    raise ValueError(f"TimeVarying: '{what}' must hold {requirement}; "
                                     f"epoch {s} has {v!r}")
        self.spec, self.what, self.repeat_last = spec, what, repeat_last
        self.check, self.requirement = check, requirement

    def __call__(self, s: int):
        if callable(self.spec):
            v = self.spec(s)
        elif s <= len(self.spec):
            v = self.spec[s - 1]
        elif self.repeat_last:
            v = self.spec[-1]
        else:
            raise IndexError(f"TimeVarying: '{self.what}' has {len(self.spec)} entries but epoch "
                             f"{s} has begun; give more entries, a callable s -> value, or "
                             f"repeat_last=True to keep the last value")
        if not self.check(v):
            raise ValueError(f"TimeVarying: '{self.what}' must give {self.requirement}; "
                             f"epoch {s} got {v!r}")
        return v

    def describe(self, probe: int = 8):
        """Sequences as they are; callables by their values at s = 1..probe, so ranks whose
        callables differ are told apart (two lambdas describe alike by name)."""
        if not callable(self.spec):
            return list(self.spec)
        try:
            return {"callable": [self.spec(s) for s in range(1, probe + 1)]}
        except Exception as exc:  # noqa: BLE001 - a callable that fails early fails in plan()
            return {"callable": f"raises {type(exc).__name__}"}


def _is_epoch_length(v) -> bool:
    return is_int(v) and v >= 1


def _is_lr(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


class _Epochs(Schedule):
    """Shared machinery of Algorithms 2 and 3: epochs of local steps, each ended by an average.

    The position is (epoch s, the local step at which it began); step t is the
    ``t - epoch_start``-th of its epoch."""

    def __init__(self):
        self.epoch = 1
        self.epoch_start = 0

    def in_epoch(self, t: int) -> int:
        return t - self.epoch_start

    def epoch_steps(self) -> int:
        """This rank's number of local steps in the current epoch."""
        raise NotImplementedError

    def epoch_end_plan(self) -> StepPlan:
        """The plan of the step that ends the current epoch (its weight: fragments' rounds
        within the epoch take it, prsgd_hvd.fragments)."""
        return self.plan(self.epoch_start + self.epoch_steps())

    def on_round(self, report: RoundReport) -> None:
        if report.kind == "scheduled":
            self.epoch += 1
        if report.kind in ("scheduled", "warmup"):
            self.epoch_start = report.t

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "epoch_start": self.epoch_start}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            self.epoch = _count(state, "epoch", 1)
            self.epoch_start = _count(state, "epoch_start")


class TimeVarying(_Epochs):
    """Algorithm 2: epoch s runs K^s local steps with learning rate gamma^s, then averages.

    Args:
        epoch_lengths: K^s, a sequence (epoch 1 first) or a callable ``s -> int >= 1``.
        lrs: gamma^s likewise, set on every param group when epoch s begins; ``None`` leaves the
            learning rate alone (so a ``torch.optim.lr_scheduler`` can drive it).
        repeat_last: when a sequence runs out, keep its last value instead of raising.
    """

    def __init__(self, epoch_lengths: ValueSpec, lrs: Optional[ValueSpec] = None,
                 repeat_last: bool = False):
        super().__init__()
        self.epoch_lengths = _Sequence(epoch_lengths, "epoch_lengths", repeat_last,
                                       _is_epoch_length, "ints >= 1")
        self.lrs = None if lrs is None else _Sequence(lrs, "lrs", repeat_last, _is_lr,
                                                      "finite numbers >= 0")
        self._paper: Optional[Dict[str, Any]] = None
        self._length_cache = (0, 0)

    @classmethod
    def paper(cls, *, lr0: float, n_workers: Optional[int] = None, k0: float = 1.0,
              lr_max: Optional[float] = None) -> "TimeVarying":
        """The slides' schedule: K^s = max(1, floor(k0 s^(1/3) / N)), gamma^s = min(lr_max,
        lr0 N / s^(2/3)).

        The theorem states K^s = floor(s^(1/3)/N) and gamma^s = N/s^(2/3) up to constants; the
        max(1, .) (an epoch has at least one step), the scale factors k0 and lr0, and the cap
        lr_max are our reading. ``n_workers=None`` takes N from the optimizer's process set.
        """
        if not _is_lr(lr0) or lr0 == 0:
            raise ValueError(f"TimeVarying.paper: 'lr0' must be a finite number > 0, got {lr0!r}")
        if k0 <= 0:
            raise ValueError(f"TimeVarying.paper: 'k0' must be > 0, got {k0!r}")
        sched = cls(lambda s: 1, None)
        sched._paper = {"lr0": lr0, "n_workers": n_workers, "k0": k0, "lr_max": lr_max}
        return sched

    def bind(self, rank, size, allgather, local_size=None) -> None:
        super().bind(rank, size, allgather, local_size)
        if self._paper is not None:  # N is the world this schedule runs in
            n = self._paper["n_workers"] or size
            k0, lr0, lr_max = self._paper["k0"], self._paper["lr0"], self._paper["lr_max"]
            self.epoch_lengths = _Sequence(lambda s: max(1, math.floor(k0 * s ** (1 / 3) / n)),
                                           "epoch_lengths", False, _is_epoch_length, "ints >= 1")
            lr_fn = (lambda s: lr0 * n / s ** (2 / 3)) if lr_max is None else \
                (lambda s: min(lr_max, lr0 * n / s ** (2 / 3)))
            self.lrs = _Sequence(lr_fn, "lrs", False, _is_lr, "finite numbers >= 0")
            self._length_cache = (0, 0)

    def epoch_length(self) -> int:
        s, k = self._length_cache
        if s != self.epoch:
            k = self.epoch_lengths(self.epoch)
            self._length_cache = (self.epoch, k)
        return k

    def epoch_steps(self) -> int:
        return self.epoch_length()

    def plan(self, t: int, elapsed: float = 0.0) -> StepPlan:
        k = self.in_epoch(t)
        length = self.epoch_length()  # a run-out sequence fails here, before the update
        lr = float(self.lrs(self.epoch)) if k == 1 and self.lrs is not None else None
        return StepPlan(average_after=k >= length, lr=lr)

    def describe(self) -> Dict[str, Any]:
        if self._paper is not None:
            return {"schedule": "TimeVarying", "paper": dict(self._paper)}
        return {"schedule": "TimeVarying", "epoch_lengths": self.epoch_lengths.describe(),
                "lrs": None if self.lrs is None else self.lrs.describe()}

    def __repr__(self) -> str:
        return f"TimeVarying(epoch={self.epoch})"


_WEIGHTS = ("uniform", "steps")


class Heterogeneous(_Epochs):
    """Algorithm 3: rank i runs ``intervals[i]`` local steps per epoch, then all ranks average.

    Args:
        intervals: one int >= 1 per rank of the process set.
        weights: ``"uniform"`` (the paper's rule: the plain mean, the default) or ``"steps"``
            (each rank's model weighted by the local steps it took in the epoch).
            ``finalize()``/``average_now()`` always take the plain mean, so every rank ends
            with the same model. Choose "uniform" unless you have measured otherwise: as
            FedNova shows, with non-IID data ranks that take more local steps already pull
            the average toward their own objective, and "steps" weighting pulls further that
            way; on label-skewed shards it did clearly worse in docs/REPRODUCTION.md. It
            suits IID data where a rank's extra steps are simply extra progress.

    Use :meth:`by_speed` or :meth:`every_seconds` to pick the counts from measured speed.
    """

    mode = "fixed"  # the counts are given; by_speed and every_seconds decide them as they go

    def __init__(self, intervals: Optional[Sequence[int]], weights: str = "uniform"):
        super().__init__()
        if self.mode != "fixed":  # a subclass measures them (by_speed) or needs none
            self.intervals: List[int] = []
        elif isinstance(intervals, (str, bytes)) or not hasattr(intervals, "__len__"):
            raise TypeError(f"Heterogeneous: 'intervals' must be a sequence of ints, one per "
                            f"rank, got {type(intervals).__name__}")
        else:
            self.intervals = [_positive_int(i, "Heterogeneous: each entry of 'intervals'")
                              for i in intervals]
        if weights not in _WEIGHTS:
            raise ValueError(f"Heterogeneous: 'weights' must be one of {_WEIGHTS}, got {weights!r}")
        self.weights = weights

    @classmethod
    def by_speed(cls, base_interval: int, calibrate_steps: int = 20,
                 weights: str = "uniform") -> "HeterogeneousBySpeed":
        """Pick I_i from each rank's measured step time.

        For the first ``calibrate_steps`` steps every rank averages every ``base_interval``
        steps and times its epochs (forward, backward and update; time spent waiting for
        rounds is left out); then the ranks agree (one allgather, announced in the round) on
        I_i = round(base_interval * t_slowest / t_i) from each rank's median time per step, so
        the slowest rank keeps ``base_interval`` and an epoch lasts about as long on every
        rank. The calibration ends with an average.
        """
        return HeterogeneousBySpeed(base_interval, calibrate_steps, weights)

    @classmethod
    def every_seconds(cls, seconds: float, weights: str = "uniform") -> "HeterogeneousEverySeconds":
        """Each rank runs local steps until ``seconds`` have passed since the last average
        (at least one step), then averages. Ranks end an epoch within one step of each other."""
        return HeterogeneousEverySeconds(seconds, weights)

    def bind(self, rank, size, allgather, local_size=None) -> None:
        super().bind(rank, size, allgather, local_size)
        if self.mode == "fixed" and len(self.intervals) != size:
            raise ValueError(f"Heterogeneous: 'intervals' has {len(self.intervals)} entries but "
                             f"the process set has {size} ranks; give one per rank")

    def _plan(self, t: int, epoch_ends: bool, agree: bool = False) -> StepPlan:
        weight = float(self.in_epoch(t)) if self.weights == "steps" else 1.0
        return StepPlan(average_after=epoch_ends, weight=weight, agree=agree)

    def epoch_steps(self) -> int:
        return self.intervals[self.rank]

    def plan(self, t: int, elapsed: float = 0.0) -> StepPlan:
        return self._plan(t, self.in_epoch(t) >= self.intervals[self.rank])

    def describe(self) -> Dict[str, Any]:
        return {"schedule": "Heterogeneous", "mode": self.mode, "weights": self.weights,
                "intervals": list(self.intervals)}

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "intervals": list(self.intervals)}

    def __repr__(self) -> str:
        return f"Heterogeneous({self.intervals}, weights={self.weights!r})"


class HeterogeneousBySpeed(Heterogeneous):
    """``Heterogeneous.by_speed``: Algorithm 3 with I_i calibrated from measured step times."""

    mode = "by_speed"

    def __init__(self, base_interval: int, calibrate_steps: int, weights: str):
        super().__init__(None, weights)
        self.base_interval = _positive_int(base_interval, "Heterogeneous.by_speed: 'base_interval'")
        self.calibrate_steps = _positive_int(calibrate_steps,
                                             "Heterogeneous.by_speed: 'calibrate_steps'")
        self.step_times: List[float] = []  # seconds per step, one entry per calibration epoch
        self.timed_steps = 0

    def calibrating(self) -> bool:
        return not self.intervals

    def plan(self, t: int, elapsed: float = 0.0) -> StepPlan:
        if not self.calibrating():
            return super().plan(t, elapsed)
        k = self.in_epoch(t)
        # The very first step has no start point (the clock starts when it calls step()).
        done = self.timed_steps + k - (1 if self.epoch == 1 else 0) >= self.calibrate_steps
        return self._plan(t, done or k >= self.base_interval, agree=done)

    def on_round(self, report: RoundReport) -> None:
        if self.calibrating() and report.kind == "scheduled":
            timed = report.steps - (1 if self.epoch == 1 else 0)
            if timed > 0:
                self.step_times.append(report.compute_seconds / timed)
                self.timed_steps += timed
        if report.agree:
            mine = None if report.finished or not self.step_times else statistics.median(self.step_times)
            everyone = self.allgather(mine)
            slowest = max((v for v in everyone if v is not None), default=1.0)
            # A rank that has already finished keeps the base interval: it takes no more steps.
            self.intervals = [self.base_interval if v is None else
                              max(1, round(self.base_interval * slowest / max(v, 1e-9)))
                              for v in everyone]
        super().on_round(report)

    def describe(self) -> Dict[str, Any]:
        return {"schedule": "Heterogeneous", "mode": self.mode, "weights": self.weights,
                "base_interval": self.base_interval, "calibrate_steps": self.calibrate_steps}

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "step_times": list(self.step_times),
                "timed_steps": self.timed_steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state:
            # Calibrated I_i are kept as long as the world size is the same; otherwise the
            # ranks calibrate again.
            saved = list(state.get("intervals", []))
            self.intervals = saved if len(saved) == self.size else []
            keep = not self.intervals and len(saved) == 0
            self.step_times = list(state.get("step_times", [])) if keep else []
            self.timed_steps = int(state.get("timed_steps", 0)) if keep else 0

    def __repr__(self) -> str:
        if self.calibrating():
            return f"Heterogeneous.by_speed(base_interval={self.base_interval}, calibrating)"
        return super().__repr__()


class HeterogeneousEverySeconds(Heterogeneous):
    """``Heterogeneous.every_seconds``: an epoch ends at the first step that begins ``seconds``
    or more after the last average (forward and backward of that step are done by then)."""

    mode = "every_seconds"

    def __init__(self, seconds: float, weights: str):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f"Heterogeneous.every_seconds: 'seconds' must be > 0, got {seconds!r}")
        super().__init__(None, weights)
        self.seconds = float(seconds)

    def plan(self, t: int, elapsed: float = 0.0) -> StepPlan:
        return self._plan(t, elapsed >= self.seconds)

    def describe(self) -> Dict[str, Any]:
        return {"schedule": "Heterogeneous", "mode": self.mode, "weights": self.weights,
                "seconds": self.seconds}

    def __repr__(self) -> str:
        return f"Heterogeneous.every_seconds({self.seconds})"


class Hierarchical(Schedule):
    """Hierarchical averaging, PyTorch's ``HierarchicalModelAverager`` convention.

    ``Hierarchical({2: 2, 8: 8})`` on 8 ranks: every 2 steps, groups of 2 consecutive ranks
    average; every 8 steps all 8 do. At step t the largest period dividing t wins. A group size
    may also be ``"host"`` (the ranks of one host: Horovod's ``local_size()``; every host must run
    the same number of ranks, numbered consecutively, as ``horovodrun -H a:2,b:2`` does) or
    ``"all"``. Each group size must divide the number of ranks, and the largest period's group
    must be all of them (as PyTorch requires), so every model eventually meets every other.
    Rounds happen before the update (Algorithm 1). Groups are Horovod process sets: start the
    job with ``HOROVOD_DYNAMIC_PROCESS_SETS=1`` (they are then created when the optimizer is
    built), or pass the same groups to ``hvd.init(process_sets=[...])``. Ranks may end after
    different numbers of steps: a rank in ``finalize()`` keeps answering its group's rounds and
    the global ones until every rank has finished.
    """

    def __init__(self, period_group_size: Dict[int, Union[int, str]]):
        if not isinstance(period_group_size, dict) or not period_group_size:
            raise TypeError("Hierarchical: give a non-empty dict {period: group_size}, "
                            f"got {period_group_size!r}")
        for period, group in period_group_size.items():
            _positive_int(period, "Hierarchical: each period")
            if group not in ("host", "all"):
                _positive_int(group, "Hierarchical: each group size (or 'host' or 'all')")
        self.spec = sorted(period_group_size.items())  # by period, ascending
        self.levels = [(p, g) for p, g in self.spec if isinstance(g, int)]

    def bind(self, rank, size, allgather, local_size=None) -> None:
        super().bind(rank, size, allgather, local_size)
        levels = []
        for period, group in self.spec:
            if group == "all":
                group = size
            elif group == "host":
                if local_size is None:
                    raise ValueError("Hierarchical: group 'host' needs the optimizer's process "
                                     "set to be all ranks, with each host's ranks numbered "
                                     "consecutively (as horovodrun -H host1:2,host2:2 does); "
                                     "give the group size as a number otherwise")
                group = local_size
            if size % group:
                raise ValueError(f"Hierarchical: group size {group} (period {period}) does not "
                                 f"divide the {size} ranks")
            levels.append((period, group))
        if levels[-1][1] != size:
            raise ValueError(f"Hierarchical: the largest period ({levels[-1][0]}) must "
                             f"average all {size} ranks, got groups of {levels[-1][1]}")
        self.levels = levels

    def _level(self, t: int) -> Optional[int]:
        for period, group in reversed(self.levels):
            if t % period == 0:
                return group
        return None

    def plan(self, t: int, elapsed: float = 0.0) -> StepPlan:
        group = self._level(t)
        if group is None:
            return NO_ACTION
        return StepPlan(average_before=True, group=None if group == self.size else group)

    def group_sizes(self) -> List[int]:
        return sorted({g for _, g in self.levels if g != self.size})

    def describe(self) -> Dict[str, Any]:
        return {"schedule": "Hierarchical", "levels": [list(level) for level in self.levels]}

    def __repr__(self) -> str:
        return f"Hierarchical({dict(self.levels)})"


class Adaptive(Schedule):
    """Algorithm 1 with an interval that adapts to measured divergence and communication.

    After every round the ranks agree (one small collective, announced in the round) on two
    means: the divergence ||x_i - x_avg||^2 measured at that round and the fraction of time
    spent waiting for it, waited / (compute time since the previous round + waited). Then:

    * divergence above ``max_divergence`` -> halve I (the models drift apart: the paper's
      lemma bounds the divergence by 4 gamma^2 I^2 G^2, so it grows with I^2);
    * otherwise, waiting above ``comm_fraction`` of the time -> double I;
    * always ``min_interval <= I <= max_interval``.

    With overlap on, a round that finished during the forward/backward pass costs no waiting,
    so the interval only grows when communication actually shows. ``stats()["schedule"]``
    shows the current interval.
    """

    def __init__(self, initial: int = 4, min_interval: int = 1, max_interval: int = 64,
                 comm_fraction: float = 0.1, max_divergence: Optional[float] = None):
        self.interval = _positive_int(initial, "Adaptive: 'initial'")
        self.min_interval = _positive_int(min_interval, "Adaptive: 'min_interval'")
        self.max_interval = _positive_int(max_interval, "Adaptive: 'max_interval'")
        if not self.min_interval <= self.interval <= self.max_interval:
            raise ValueError(f"Adaptive: need min_interval <= initial <= max_interval, got "
                             f"{min_interval}, {initial}, {max_interval}")
        if not 0 < comm_fraction < 1:
            raise ValueError(f"Adaptive: 'comm_fraction' must be in (0, 1), got {comm_fraction!r}")
        if max_divergence is not None and not max_divergence > 0:
            raise ValueError(f"Adaptive: 'max_divergence' must be > 0, got {max_divergence!r}")
        self.initial = self.interval
        self.comm_fraction, self.max_divergence = comm_fraction, max_divergence
        self.next_round = self.interval
        self.history: List[int] = []  # the interval after each round

    def plan(self, t: int, elapsed: float = 0.0) -> StepPlan:
        return StepPlan(average_before=True, agree=True) if t == self.next_round else NO_ACTION

    def on_round(self, report: RoundReport) -> None:
        if report.kind == "warmup":
            self.next_round = report.t + self.interval
            return
        if not report.agree:
            return
        mine = None
        if not report.finished:
            compute = max(report.compute_seconds, 1e-9)
            mine = (report.divergence or 0.0,
                    report.waited_seconds / (compute + report.waited_seconds))
        everyone = [v for v in self.allgather(mine) if v is not None]
        if report.finished or not everyone:
            return
        mean_divergence = sum(d for d, _ in everyone) / len(everyone)
        mean_fraction = sum(f for _, f in everyone) / len(everyone)
        if self.max_divergence is not None and mean_divergence > self.max_divergence:
            self.interval = max(self.min_interval, self.interval // 2)
        elif mean_fraction > self.comm_fraction:
            self.interval = min(self.max_interval, self.interval * 2)
        self.next_round = report.t + self.interval
        self.history.append(self.interval)

    def describe(self) -> Dict[str, Any]:
        return {"schedule": "Adaptive", "initial": self.initial, "min": self.min_interval,
                "max": self.max_interval, "comm_fraction": self.comm_fraction,
                "max_divergence": self.max_divergence}

    def state_dict(self) -> Dict[str, Any]:
        return {"interval": self.interval, "next_round": self.next_round,
                "history": list(self.history)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            self.interval = _count(state, "interval", 1)
            self.next_round = _count(state, "next_round", 1)
            self.history = list(state.get("history", []))

    def __repr__(self) -> str:
        return f"Adaptive(interval={self.interval})"


def as_schedule(interval: Any) -> Schedule:
    """Accept an ``int >= 1`` (shorthand for :class:`FixedInterval`) or a :class:`Schedule`."""
    if isinstance(interval, Schedule):
        return interval
    if is_int(interval):
        if interval < 1:
            raise ValueError(f"DistributedLocalSGD: 'interval' must be >= 1, got {interval}; "
                             "use interval=1 to average at every step")
        return FixedInterval(interval)
    raise TypeError(f"DistributedLocalSGD: 'interval' must be an int >= 1 or a schedule "
                    f"(FixedInterval, TimeVarying, Heterogeneous), got {type(interval).__name__}")
