"""The clock that time-based schedules read, and the reports they hear back.

Schedules that adapt (``Heterogeneous.every_seconds``, ``.by_speed``, ``Adaptive``) plan from
the time since the last scheduled round and learn, after each round, how long its steps
computed and how long the round was waited for. Both are measured here, per optimizer: compute
time is wall time minus what the rounds' waits took in between (every averager's, group rounds
included), so a slow link does not read as slow compute.
"""
from __future__ import annotations

import time
from typing import Optional

from .schedules import RoundReport


class ScheduleClock:
    def __init__(self):
        self.since: Optional[float] = None   # the last scheduled round (or the first step)
        self.waited_since = 0.0              # total wait of all averagers at that point
        self.last_round_t = 0                # the step of that round

    @property
    def started(self) -> bool:
        return self.since is not None

    def elapsed(self, now: Optional[float] = None) -> float:
        """Seconds since the last scheduled round; starts the clock at the first call."""
        now = time.perf_counter() if now is None else now
        if self.since is None:
            self.since = now
        return now - self.since

    def peek(self) -> float:
        """Like :meth:`elapsed`, without starting the clock (the overlap lookahead)."""
        now = time.perf_counter()
        return now - (self.since if self.since is not None else now)

    def restart_at(self, t: int) -> None:
        """A checkpoint was loaded at step ``t``: the next round's steps count from there."""
        self.last_round_t = t

    def report(self, t: int, waited: float, total_waited: float, divergence: Optional[float],
               agree: bool) -> RoundReport:
        """The schedule's report of its round at step ``t``, which restarts the clock."""
        now = time.perf_counter()
        since = self.since if self.since is not None else now
        report = RoundReport(
            t=t, kind="scheduled", steps=t - self.last_round_t,
            compute_seconds=max(0.0, (now - since) - (total_waited - self.waited_since)),
            waited_seconds=waited, divergence=divergence, agree=agree)
        self.since, self.waited_since, self.last_round_t = now, total_waited, t
        return report
