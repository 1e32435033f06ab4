"""When to average: the schedules accepted by ``DistributedLocalSGD(interval=...)``.

A schedule is asked twice per ``step()`` call t = 1, 2, ... on this rank:

* ``before_step(t)``: average the models *before* this step's update (Algorithm 1: the update,
  computed from the local gradient, is applied to the average), and which learning rate to set;
* ``after_step(t)``: average *after* the update (Algorithms 2 and 3: an epoch ends with an
  average, so the next gradient is taken at the average).

NOTE: [schedules are deterministic per rank]
Every rank must reach the same number of averaging rounds in the same order, because each round
is a collective. A schedule therefore decides from its own counters, from values every rank
agreed on (``describe()`` is compared across ranks at construction; ``by_speed`` agrees on its
intervals with one allgather), or -- only for ``Heterogeneous.every_seconds`` -- from a clock
whose epochs all ranks start together at the end of a round. Ranks with different step counts
per epoch still meet: every rank joins every round, whatever its count.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

__all__ = ["Schedule", "StepPlan", "FixedInterval", "TimeVarying", "Heterogeneous", "Hierarchical",
           "Adaptive", "as_schedule"]

ValueSpec = Union[Sequence[float], Callable[[int], float]]


@dataclass(frozen=True)
class StepPlan:
    """What ``step()`` does before the optimizer's own update."""

    average_before: bool = False  # x_i <- avg(x^{t-1}) before the update (Algorithm 1)
    lr: Optional[float] = None    # set on every param group before the update, when not None


NO_ACTION = StepPlan()


class Schedule:
    """Base class. Subclasses override the decisions they make and keep their position in
    ``state_dict`` so that a resumed run averages at the same steps."""

    rank = 0
    size = 1

    def bind(self, rank: int, size: int, allgather: Callable[[Any], List[Any]]) -> None:
        """Called once by the optimizer: this rank, the number of ranks, and a collective
        ``allgather(obj) -> [obj of rank 0, ...]`` over the optimizer's process set."""
        self.rank, self.size, self._allgather = rank, size, allgather

    def before_step(self, t: int) -> StepPlan:
        return NO_ACTION

    def will_average_before(self, t: int) -> bool:
        """Lookahead without side effects: will ``before_step(t)`` ask for an average? Lets the
        optimizer start that round's allreduce as soon as step t-1 ends (overlap)."""
        return False

    def after_step(self, t: int) -> bool:
        return False

    def group_sizes(self) -> List[int]:
        """Sizes of the rank groups this schedule averages within, besides the whole set."""
        return []

    def before_step_group(self, t: int) -> Optional[int]:
        """Lookahead without side effects: the group size of step ``t``'s round (None: all)."""
        return None

    def round_weight(self) -> float:
        """This rank's weight in the average about to be taken (1.0: plain mean)."""
        return 1.0

    def round_done(self) -> None:
        """Called after every scheduled averaging round."""

    def observe(self, t: int, divergence: Optional[float], waited_seconds: float) -> None:
        """Called after every scheduled round, before ``round_done``: the step it happened in,
        this rank's divergence from the average and how long it waited for the round."""

    def describe(self) -> Dict[str, Any]:
        """What every rank must agree on (compared across ranks at construction)."""
        return {"schedule": type(self).__name__}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return value


class FixedInterval(Schedule):
    """Algorithm 1: average every ``interval`` steps (at t = I, 2I, ...), before the update."""

    def __init__(self, interval: int):
        self.interval = _positive_int(interval, "FixedInterval: 'interval'")

    def before_step(self, t: int) -> StepPlan:
        return StepPlan(average_before=self.will_average_before(t))

    def will_average_before(self, t: int) -> bool:
        return t % self.interval == 0

    def describe(self) -> Dict[str, Any]:
        return {"schedule": "FixedInterval", "interval": self.interval}

    def __repr__(self) -> str:
        return f"FixedInterval({self.interval})"


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

    def describe(self):
        return "callable" if callable(self.spec) else list(self.spec)


def _is_epoch_length(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_lr(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


class _Epochs(Schedule):
    """Shared machinery of Algorithms 2 and 3: epochs of local steps, each ended by an average."""

    def __init__(self):
        self.epoch = 1          # s, 1-based
        self.step_in_epoch = 0  # local steps taken in the current epoch

    def epoch_length(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, t: int) -> bool:
        self.step_in_epoch += 1
        return self.step_in_epoch >= self.epoch_length()

    def round_done(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            self.epoch = int(state["epoch"])
            self.step_in_epoch = int(state["step_in_epoch"])


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
        sched = cls(lambda s: 1, None)
        sched._paper = {"lr0": lr0, "n_workers": n_workers, "k0": k0, "lr_max": lr_max}
        if not _is_lr(lr0) or lr0 == 0:
            raise ValueError(f"TimeVarying.paper: 'lr0' must be a finite number > 0, got {lr0!r}")
        if k0 <= 0:
            raise ValueError(f"TimeVarying.paper: 'k0' must be > 0, got {k0!r}")
        return sched

    def bind(self, rank: int, size: int, allgather) -> None:
        super().bind(rank, size, allgather)
        paper = getattr(self, "_paper", None)
        if paper is not None:
            n = paper["n_workers"] or size
            k0, lr0, lr_max = paper["k0"], paper["lr0"], paper["lr_max"]
            self.epoch_lengths = _Sequence(lambda s: max(1, math.floor(k0 * s ** (1 / 3) / n)),
                                           "epoch_lengths", False, _is_epoch_length, "ints >= 1")
            lr_fn = (lambda s: lr0 * n / s ** (2 / 3)) if lr_max is None else \
                (lambda s: min(lr_max, lr0 * n / s ** (2 / 3)))
            self.lrs = _Sequence(lr_fn, "lrs", False, _is_lr, "finite numbers >= 0")

    def epoch_length(self) -> int:
        s, k = self._length_cache
        if s != self.epoch:
            k = self.epoch_lengths(self.epoch)
            self._length_cache = (self.epoch, k)
        return k

    def before_step(self, t: int) -> StepPlan:
        if self.step_in_epoch == 0:
            self.epoch_length()  # a run-out sequence fails here, before the update
            if self.lrs is not None:
                return StepPlan(lr=float(self.lrs(self.epoch)))
        return NO_ACTION

    def describe(self) -> Dict[str, Any]:
        d = {"schedule": "TimeVarying"}
        paper = getattr(self, "_paper", None)
        if paper is not None:
            d["paper"] = dict(paper)
        else:
            d["epoch_lengths"] = self.epoch_lengths.describe()
            d["lrs"] = None if self.lrs is None else self.lrs.describe()
        return d

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

    def __init__(self, intervals: Sequence[int], weights: str = "uniform"):
        super().__init__()
        if isinstance(intervals, (str, bytes)) or not hasattr(intervals, "__len__"):
            raise TypeError(f"Heterogeneous: 'intervals' must be a sequence of ints, one per "
                            f"rank, got {type(intervals).__name__}")
        self.intervals = [_positive_int(i, "Heterogeneous: each entry of 'intervals'")
                          for i in intervals]
        if weights not in _WEIGHTS:
            raise ValueError(f"Heterogeneous: 'weights' must be one of {_WEIGHTS}, got {weights!r}")
        self.weights = weights
        self.mode = "fixed"

    @classmethod
    def by_speed(cls, base_interval: int, calibrate_steps: int = 20,
                 weights: str = "uniform") -> "Heterogeneous":
        """Pick I_i from each rank's measured step time.

        For the first ``calibrate_steps`` timed steps every rank averages every
        ``base_interval`` steps while timing its steps (forward, backward and update, from the
        end of one ``step()`` call to the end of the next; time spent in averaging rounds is
        left out); then the ranks agree (one allgather) on I_i = round(base_interval * t_slowest /
        t_i) from the median step times, so the slowest rank keeps ``base_interval`` and an
        epoch lasts about as long on every rank. The calibration ends with an average.
        """
        sched = cls([1], weights)
        sched.intervals = []
        sched.mode = "by_speed"
        sched.base_interval = _positive_int(base_interval, "Heterogeneous.by_speed: 'base_interval'")
        sched.calibrate_steps = _positive_int(calibrate_steps,
                                              "Heterogeneous.by_speed: 'calibrate_steps'")
        sched.step_times: List[float] = []
        return sched

    @classmethod
    def every_seconds(cls, seconds: float, weights: str = "uniform") -> "Heterogeneous":
        """Each rank runs local steps until ``seconds`` have passed since the last average
        (at least one step), then averages. Ranks end an epoch within one step of each other."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f"Heterogeneous.every_seconds: 'seconds' must be > 0, got {seconds!r}")
        sched = cls([1], weights)
        sched.intervals = []
        sched.mode = "every_seconds"
        sched.seconds = float(seconds)
        return sched

    def bind(self, rank: int, size: int, allgather) -> None:
        super().bind(rank, size, allgather)
        if self.mode == "fixed" and len(self.intervals) != size:
            raise ValueError(f"Heterogeneous: 'intervals' has {len(self.intervals)} entries but "
                             f"the process set has {size} ranks; give one per rank")
        self._clock: Optional[float] = None   # end of the last step() or round
        self._epoch_started: Optional[float] = None

    # ---- timing (by_speed, every_seconds) ----------------------------------------------------
    # A step's time runs from the end of the previous step() call (or of the last round) to
    # the end of this step's update, so it covers forward, backward and the update but not
    # the time spent waiting in averaging rounds. The very first step has no start point.
    def before_step(self, t: int) -> StepPlan:
        if self._epoch_started is None:
            self._epoch_started = time.perf_counter()
        return NO_ACTION

    def _step_time(self) -> Optional[float]:
        now = time.perf_counter()
        elapsed = None if self._clock is None else now - self._clock
        self._clock = now
        return elapsed

    def _calibrating(self) -> bool:
        return self.mode == "by_speed" and not self.intervals

    def epoch_length(self) -> int:
        if self._calibrating():
            return self.base_interval
        return self.intervals[self.rank]

    def after_step(self, t: int) -> bool:
        self.step_in_epoch += 1
        if self.mode == "every_seconds":
            self._clock = time.perf_counter()
            return self._clock - self._epoch_started >= self.seconds
        if self._calibrating():
            elapsed = self._step_time()
            if elapsed is not None:
                self.step_times.append(elapsed)
            if len(self.step_times) >= self.calibrate_steps:
                self._agree_on_intervals()
                return True  # start the measured epochs from a common model
            return self.step_in_epoch >= self.base_interval
        return self.step_in_epoch >= self.intervals[self.rank]

    def _agree_on_intervals(self) -> None:
        mine = statistics.median(self.step_times)
        all_times = self._allgather(mine)
        slowest = max(all_times)
        self.intervals = [max(1, round(self.base_interval * slowest / max(t, 1e-9)))
                          for t in all_times]

    def round_done(self) -> None:
        super().round_done()
        self._epoch_started = self._clock = time.perf_counter()

    def round_weight(self) -> float:
        return float(self.step_in_epoch) if self.weights == "steps" else 1.0

    def describe(self) -> Dict[str, Any]:
        d = {"schedule": "Heterogeneous", "mode": self.mode, "weights": self.weights}
        if self.mode == "fixed":
            d["intervals"] = list(self.intervals)
        elif self.mode == "by_speed":
            d.update(base_interval=self.base_interval, calibrate_steps=self.calibrate_steps)
        else:
            d["seconds"] = self.seconds
        return d

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["intervals"] = list(self.intervals)
        if self.mode == "by_speed":
            sd["step_times"] = list(self.step_times)
        return sd

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state and self.mode != "fixed":
            # Calibrated I_i are kept as long as the world size is the same.
            saved = list(state.get("intervals", []))
            self.intervals = saved if len(saved) == self.size else []
            if self.mode == "by_speed":
                self.step_times = list(state.get("step_times", [])) if not self.intervals else []

    def __repr__(self) -> str:
        if self.mode == "every_seconds":
            return f"Heterogeneous.every_seconds({self.seconds})"
        if self._calibrating():
            return f"Heterogeneous.by_speed(base_interval={self.base_interval}, calibrating)"
        return f"Heterogeneous({self.intervals}, weights={self.weights!r})"


class Hierarchical(Schedule):
    """Hierarchical averaging, PyTorch's ``HierarchicalModelAverager`` convention.

    ``Hierarchical({2: 2, 8: 8})`` on 8 ranks: every 2 steps, groups of 2 consecutive ranks
    average; every 8 steps all 8 do. At step t the largest period dividing t wins. Each
    group size must divide the number of ranks, and the largest period's group must be all of
    them (as PyTorch requires), so every model eventually meets every other. Rounds happen
    before the update (Algorithm 1). Groups are Horovod process sets: start the job with
    ``HOROVOD_DYNAMIC_PROCESS_SETS=1`` (they are then created when the optimizer is built),
    or pass the same groups to ``hvd.init(process_sets=[...])``. All ranks must run the same
    number of steps: ``finalize()``'s join protocol covers rounds of the whole set only, so a
    rank that stops early would leave its group's next round waiting.
    """

    def __init__(self, period_group_size: Dict[int, int]):
        if not isinstance(period_group_size, dict) or not period_group_size:
            raise TypeError("Hierarchical: give a non-empty dict {period: group_size}, "
                            f"got {period_group_size!r}")
        for period, group in period_group_size.items():
            _positive_int(period, "Hierarchical: each period")
            _positive_int(group, "Hierarchical: each group size")
        self.levels = sorted(period_group_size.items())  # by period, ascending

    def bind(self, rank: int, size: int, allgather) -> None:
        super().bind(rank, size, allgather)
        for period, group in self.levels:
            if size % group:
                raise ValueError(f"Hierarchical: group size {group} (period {period}) does not "
                                 f"divide the {size} ranks")
        if self.levels[-1][1] != size:
            raise ValueError(f"Hierarchical: the largest period ({self.levels[-1][0]}) must "
                             f"average all {size} ranks, got groups of {self.levels[-1][1]}")

    def _level(self, t: int) -> Optional[int]:
        for period, group in reversed(self.levels):
            if t % period == 0:
                return group
        return None

    def will_average_before(self, t: int) -> bool:
        return self._level(t) is not None

    def before_step(self, t: int) -> StepPlan:
        if self._level(t) is None:
            return NO_ACTION
        return StepPlan(average_before=True)

    def before_step_group(self, t: int) -> Optional[int]:
        group = self._level(t)
        return None if group is None or group == self.size else group

    def group_sizes(self) -> List[int]:
        return sorted({g for _, g in self.levels if g != self.size})

    def describe(self) -> Dict[str, Any]:
        return {"schedule": "Hierarchical", "levels": [list(level) for level in self.levels]}

    def __repr__(self) -> str:
        return f"Hierarchical({dict(self.levels)})"


class Adaptive(Schedule):
    """Algorithm 1 with an interval that adapts to measured divergence and communication.

    After every round the ranks agree (one small collective) on two means: the divergence
    ||x_i - x_avg||^2 measured at that round and the fraction of time spent waiting for it,
    waited / (compute time since the previous round + waited). Then:

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
        self.comm_fraction, self.max_divergence = comm_fraction, max_divergence
        self.next_round = self.interval
        self.history: List[int] = []  # the interval after each round
        self._since = None

    def will_average_before(self, t: int) -> bool:
        return t == self.next_round

    def before_step(self, t: int) -> StepPlan:
        if self._since is None:
            self._since = time.perf_counter()
        return StepPlan(average_before=self.will_average_before(t))

    def observe(self, t: int, divergence: Optional[float], waited_seconds: float) -> None:
        now = time.perf_counter()
        elapsed = now - (self._since if self._since is not None else now)
        compute = max(elapsed - waited_seconds, 1e-9)
        mine = (divergence or 0.0, waited_seconds / (compute + waited_seconds))
        everyone = self._allgather(mine)
        mean_divergence = sum(d for d, _ in everyone) / len(everyone)
        mean_fraction = sum(f for _, f in everyone) / len(everyone)
        if self.max_divergence is not None and mean_divergence > self.max_divergence:
            self.interval = max(self.min_interval, self.interval // 2)
        elif mean_fraction > self.comm_fraction:
            self.interval = min(self.max_interval, self.interval * 2)
        self.next_round = t + self.interval
        self.history.append(self.interval)
        self._since = time.perf_counter()

    def describe(self) -> Dict[str, Any]:
        return {"schedule": "Adaptive", "min": self.min_interval, "max": self.max_interval,
                "comm_fraction": self.comm_fraction, "max_divergence": self.max_divergence}

    def state_dict(self) -> Dict[str, Any]:
        return {"interval": self.interval, "next_round": self.next_round,
                "history": list(self.history)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            self.interval, self.next_round = int(state["interval"]), int(state["next_round"])
            self.history = list(state.get("history", []))

    def __repr__(self) -> str:
        return f"Adaptive(interval={self.interval})"


def as_schedule(interval: Any) -> Schedule:
    """Accept an ``int >= 1`` (shorthand for :class:`FixedInterval`) or a :class:`Schedule`."""
    if isinstance(interval, Schedule):
        return interval
    if isinstance(interval, int) and not isinstance(interval, bool):
        if interval < 1:
            raise ValueError(f"DistributedLocalSGD: 'interval' must be >= 1, got {interval}; "
                             "use interval=1 to average at every step")
        return FixedInterval(interval)
    raise TypeError(f"DistributedLocalSGD: 'interval' must be an int >= 1 or a schedule "
                    f"(FixedInterval, TimeVarying, Heterogeneous), got {type(interval).__name__}")
