"""``finalize()``: the join protocol, so ranks may stop after different numbers of steps.

A rank that has finished keeps contributing its model to the rounds of the ranks that are still
training, as ``hvd.join`` does for gradients, until a round in which no rank is (its control
records say who is active: NOTE: [control records]). Every rank then holds the same average.

How a finished rank knows which round comes next depends on the world, not on the schedule's
class: with one averager every round is on it, so the rank answers round after round; with
several (a schedule that also averages within groups of ranks) it cannot tell from a round
which averager the next one uses, so it walks the steps it no longer takes and answers the
rounds the plan makes at each -- plans that are a function of the step, the same on every rank.

NOTE: [the round after a prestart]
A round prestarted for step t (NOTE: [overlap]) was packed when step t-1 ended, so its control
record says "active": the rank could not yet know it would call finalize() instead of taking
step t. Released in finalize(), that round holds the models the rank's first join round would
have sent, so it stands for that round -- but it counted the rank as training, so the protocol
asks once more, and that extra round is not idempotent: an outer optimizer's momentum takes one
more step, a 16-bit wire sends its residuals. So a rank marks the round after a release "final"
(a join round that also says "I released the round before"). The previous round's active count
minus this round's "final" count is how many ranks really trained after the previous round;
when that is none, nobody trained since, the previous round was the last one the protocol
without overlap makes, and this one is dropped unwritten and uncounted on every rank alike (all
see the same records). finalize() then ends with the rounds, values and wire state it has
without overlap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .averaging import Averager, PendingRound, Round, RoundId
from .schedules import RoundReport

if TYPE_CHECKING:  # pragma: no cover
    from .local_sgd import LocalSGD


class JoinProtocol:
    def __init__(self, engine: "LocalSGD"):
        self.engine = engine

    def run(self) -> None:
        e = self.engine
        if e.streaming is not None:  # this rank's delayed rounds merge first (NOTE: [streaming])
            e.streaming.drain()
        self.previous_active: Optional[int] = None  # of the last round joined
        pending = e.inflight.release()
        if pending is not None:
            # Prestarted for a step this rank will not take; the other ranks may take it, so
            # join it like any of their rounds.
            self._join(pending.averager, pending=pending, identity=pending.identity)
        if e.streaming is not None and e.streaming.fragments > 1:
            self._follow_the_fragments(e.local_step + 1)
        elif len(e.world.averagers) > 1:
            # A prestarted round belonged to the next step: the walk starts after it.
            self._follow_the_plan(e.local_step + (2 if pending else 1))
        else:
            # NOTE: [the round after a prestart]
            rnd = self._join(e.world.averager, final=pending is not None)
            while rnd.active_ranks:
                rnd = self._join(e.world.averager)

    def _join(self, averager: Averager, pending: Optional[PendingRound] = None,
              identity: Optional[RoundId] = None, final: bool = False) -> Round:
        e = self.engine
        identity = identity or RoundId("final" if final else "join", e.rounds + 1)
        rnd, _, _ = e.run_round(identity, averager, active=False, pending=pending,
                                drop=self._nobody_trained_since_the_last)
        self.previous_active = rnd.active_ranks
        if rnd.agree:  # a training rank's schedule agrees after this round: answer it
            e.planner.on_round(RoundReport(t=e.local_step, kind="join", agree=True))
        return rnd

    def _nobody_trained_since_the_last(self, rnd: Round) -> bool:
        final = rnd.count("final")  # only ever sent on the path of one averager
        return final > 0 and self.previous_active == final

    def _follow_the_fragments(self, t: int) -> None:
        """fragments=F: answer the fragment rounds the others make from step ``t`` on; once a
        round finds no rank still training, every rank takes one round of each other fragment,
        so every fragment ends averaged over the final models."""
        e = self.engine
        fragments = e.world.whole_set_averagers
        for averager in e.streaming.frags.walk(t):
            if self._join(averager).active_ranks == 0:
                k = fragments.index(averager)
                for other in fragments[k + 1:] + fragments[:k]:
                    self._join(other)
                return

    def _follow_the_plan(self, t: int) -> None:
        """Answer each round the plan makes from step ``t`` on -- the group's and the whole
        set's -- until a round over the whole set finds no rank still training."""
        e = self.engine
        while True:
            plan = e.planner.plan(t)
            t += 1
            if not plan.averages:
                continue
            rnd = self._join(e.world.averager_for(plan))
            if plan.group is None and rnd.active_ranks == 0:
                return
