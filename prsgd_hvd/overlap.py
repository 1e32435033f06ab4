"""The round in flight between two ``step()`` calls (``DistributedLocalSGD(overlap=True)``).

NOTE: [overlap]
Algorithm 1 averages x^{t-1}, which is final as soon as step t-1 returns. So when step t will
average before its update, step t-1 ends by packing the parameters and starting the allreduce;
step t's forward and backward run while Horovod's background thread moves the bytes, and step
t only waits for what is left. The packed copy is a snapshot: code that changes the parameters
between step() calls (other than through this optimizer) must pass overlap=False. Model buffers
(``model=``) are such state: BatchNorm updates its statistics in step t's own forward pass, so
an optimizer that averages buffers does not prestart (prsgd_hvd.local_sgd).

A round is held here under the key of the step it was started for. Step t takes it only when
its own plan asks for the same round (same step, group, weight); anything else -- the schedule
changed its mind, ``average_now()``, ``load_state_dict()`` -- first *cancels* it: waits for it
(every rank started it, so it completes) and drops the result without counting it, on every
rank alike, so the next round reuses its number. A round whose wait was interrupted (an
exception while waiting) stays held, and the retried step takes it up where it stopped; a round
whose collective failed is over and is not held. When the world itself is gone (an elastic
restore or reset), the held round is *forgotten*: dropped without waiting.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, Optional

from .averaging import PendingRound, RoundId

if TYPE_CHECKING:  # pragma: no cover
    from .local_sgd import LocalSGD


class InFlight:
    def __init__(self):
        self.pending: Optional[PendingRound] = None
        self.key: Optional[Hashable] = None

    def hold(self, pending: PendingRound, key: Hashable) -> None:
        assert self.pending is None, "one round in flight at a time"
        self.pending, self.key = pending, key

    def take(self, key: Hashable) -> Optional[PendingRound]:
        """The held round if it was started for ``key``; otherwise cancel what is held."""
        if self.pending is not None and self.key == key:
            pending, self.pending, self.key = self.pending, None, None
            return pending
        self.cancel()
        return None

    def release(self) -> Optional[PendingRound]:
        """Hand over whatever is held (finalize() joins it as a round)."""
        pending, self.pending, self.key = self.pending, None, None
        return pending

    def cancel(self) -> None:
        pending = self.release()
        if pending is not None and not pending.failed:
            pending.wait()

    def forget(self) -> None:
        """The world the round was started in is gone (a failed collective before an elastic
        restore, or the reset itself): waiting could only raise Horovod's error again."""
        pending = self.release()
        if pending is not None:
            pending.abandon()


class Prestarts:
    """Whether one optimizer's rounds start early, and starting them (the pipeline's stage
    'prestart')."""

    def __init__(self, engine: "LocalSGD"):
        self.e = engine
        self.on = self.decide()

    def decide(self) -> bool:
        """Model buffers (BatchNorm statistics) change in the forward pass of the averaging
        step itself, after a prestarted round packed them: such rounds are not started early.
        Decided again after an elastic reset (the world size may have changed)."""
        e = self.e
        if e.outer is not None and len(e.world.averagers) > 1:
            # An outer optimizer with rounds within groups: finalize()'s walk through the plan
            # after a released prestart would make one more outer round than without overlap
            # (with one averager it does not: prsgd_hvd.join, NOTE: [the round after a
            # prestart]).
            self.on = False
        elif e.config.streaming:  # a delayed round already runs behind the steps
            self.on = False
        else:
            self.on = e.config.overlap and e.world.size > 1 and \
                not e.contents.buffers(e.contents.params())
        return self.on

    def prestart(self, t: int) -> None:
        """Start step ``t``'s round now if it averages before its update."""
        e = self.e
        if not self.on or e.inflight.pending is not None:
            return
        try:
            plan = e.planner.plan(t, e.clock.peek())
        except Exception:  # noqa: BLE001 - step t asks again and raises where the user sees it
            return
        if not plan.average_before:
            return
        e.round_stage.prestart(t, e.world.averager_for(plan),
                               RoundId("scheduled", e.rounds + 1), plan.weight, plan.agree)
