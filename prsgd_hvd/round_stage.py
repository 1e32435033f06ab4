"""The 'round' and 'check' stages of the step pipeline: run one round and make sure of it.

A round is taken from the one held in flight when it is the round asked for (NOTE: [overlap]),
or started; waited for; checked -- every rank in the same round with the same layout, the
initial fingerprint at round 1 -- and settled by the non-finite policy, which may run it again
with this rank left out. What comes out is a :class:`~prsgd_hvd.averaging.Round` ready for its
update rule.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Optional, Tuple

from . import agreement
from .averaging import Averager, PendingRound, Round, RoundId, RoundLayoutError
from .nonfinite import NonFinitePolicy
from .overlap import InFlight
from .round_contents import RoundContents
from .world import World


def round_key(t: Optional[int], identity: RoundId, averager: Averager, weight: float,
              agree: bool) -> Hashable:
    """What a held round must match to be taken by the step that asks (NOTE: [overlap]): the
    one place that says which round a held one is."""
    return (t, identity.kind, id(averager), weight, agree)


class RoundStage:
    def __init__(self, world: World, contents: RoundContents, policy: NonFinitePolicy,
                 optimizer, describe: Callable[[], Dict[str, Any]],
                 local_step: Callable[[], int]):
        self.world, self.contents, self.policy, self.opt = world, contents, policy, optimizer
        self.describe = describe        # the agreement description, to explain a mismatch
        self.local_step = local_step    # for the messages
        self.inflight = InFlight()
        self.fingerprint = 0            # of the initial parameters, sent in round 1

    def start(self, averager: Averager, identity: RoundId, tensors=None, **kwargs) -> PendingRound:
        """Start a round over ``tensors`` (default: everything the optimizer averages)."""
        self.world.claim_name()
        if tensors is None:
            tensors, _ = self.contents.tensors(self.world.collectives)
        fingerprint = self.fingerprint if identity.number == 1 else 0
        return averager.start(tensors, identity, fingerprint=fingerprint, **kwargs)

    def prestart(self, t: int, averager: Averager, identity: RoundId, weight: float,
                 agree: bool) -> None:
        """Start step ``t``'s round now and hold it until that step asks for it."""
        pending = self.start(averager, identity, weight=weight, agree=agree)
        self.inflight.hold(pending, round_key(t, identity, averager, weight, agree))

    def run(self, identity: RoundId, averager: Averager, *, t: Optional[int], weight: float,
            active: bool, agree: bool, pending: Optional[PendingRound],
            tensors=None) -> Tuple[Round, bool]:
        """Run one round (or finish ``pending``) and check it; returns it and whether this rank
        was left out of it (``nonfinite="exclude"``)."""
        key = round_key(t, identity, averager, weight, agree)
        if pending is None:
            pending = self.inflight.take(key)
        if pending is None:
            pending = self.start(averager, identity, tensors=tensors, weight=weight,
                                 active=active, agree=agree)
        self.inflight.hold(pending, key)  # an interrupted wait resumes from here
        try:
            rnd = pending.wait()
        except BaseException as exc:
            if pending.failed:  # over; only an interrupted wait stays held, to be resumed
                self.inflight.release()
            if isinstance(exc, RoundLayoutError):
                raise agreement.explain_layout_mismatch(self.describe(), averager.process_set,
                                                        str(exc)) from exc
            raise
        self.inflight.release()
        return self._check(rnd, identity, averager, weight, active, agree)

    def _check(self, rnd: Round, identity: RoundId, averager: Averager, weight: float,
               active: bool, agree: bool) -> Tuple[Round, bool]:
        rnd.check_identity()
        if identity.number == 1:
            agreement.check_fingerprints(rnd.fingerprints(), rnd.members)
        def where() -> str:
            return (f"averaging round {identity.number} (after {self.local_step()} local steps "
                    f"on rank {self.world.global_rank()})")

        def rerun(contribute: bool) -> Round:
            return averager.start(rnd.layout.tensors, identity, weight=weight, active=active,
                                  contribute=contribute, agree=agree).wait()

        return self.policy.settle(rnd, averager.collectives, where, averager.wire.name, rerun,
                                  self.opt)
