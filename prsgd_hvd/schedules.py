"""When to average: the schedules accepted by ``DistributedLocalSGD(interval=...)``.

A schedule answers one question per ``step()`` call t = 1, 2, ... on this rank: average the
models before this step's update (Algorithm 1: the update is applied to the average), after it
(Algorithms 2 and 3: the epoch ends with an average, so the next gradient is taken there), or
not at all -- and which learning rate, if any, to set first.

NOTE: [schedules are deterministic per rank]
Every rank must reach the same number of averaging rounds in the same order, because each round
is a collective. A schedule therefore decides from its own counters and from values agreed at
construction, never from anything that differs between ranks at run time. The optimizer checks
at construction that all ranks describe the same schedule (``describe()``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

__all__ = ["Schedule", "StepPlan", "FixedInterval", "as_schedule"]


@dataclass(frozen=True)
class StepPlan:
    """What one ``step()`` does besides the optimizer's own update."""

    average_before: bool = False  # x_i <- avg(x^{t-1}) before the update (Algorithm 1)
    average_after: bool = False   # x_i <- avg(x^t) after the update (end of an epoch, Alg. 2/3)
    lr: Optional[float] = None    # set on every param group before the update, when not None


class Schedule:
    """Base class. Subclasses implement :meth:`plan` and keep their position in ``state_dict``."""

    def bind(self, rank: int, size: int) -> None:
        """Called once by the optimizer with this rank's index and the number of ranks."""
        self.rank, self.size = rank, size

    def plan(self, t: int) -> StepPlan:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        """What every rank must agree on (compared across ranks at construction)."""
        return {"schedule": type(self).__name__}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class FixedInterval(Schedule):
    """Algorithm 1: average every ``interval`` steps (at t = I, 2I, ...), before the update."""

    def __init__(self, interval: int):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"FixedInterval: 'interval' must be an int >= 1, got {interval!r}")
        self.interval = interval

    def plan(self, t: int) -> StepPlan:
        return StepPlan(average_before=(t % self.interval == 0))

    def describe(self) -> Dict[str, Any]:
        return {"schedule": "FixedInterval", "interval": self.interval}

    def __repr__(self) -> str:
        return f"FixedInterval({self.interval})"


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
                    f"(FixedInterval, TimeVarying, Heterogeneous, ...), got {type(interval).__name__}")
