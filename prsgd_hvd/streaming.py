"""Streaming rounds: a round runs behind local steps (``delay=tau``) over a fragment of the model
(``fragments=F``). Off (tau=0, F=1) the pipeline of prsgd_hvd.local_sgd runs as it always did.

NOTE: [streaming]
*Delay.* The round that the schedule makes before the update of step t (Algorithm 1; an epoch
that ends after step t's update, Algorithms 2 and 3, is "before the update of step t+1") packs
x_sent -- the same model as without delay -- and starts. The rank applies the updates of steps
t, ..., t+tau-1 locally without it; before the update of step t+tau it waits for the round and
merges it, keeping its local progress:

    x <- x + (c - x_sent)     c: the round's common point -- the average ybar, or with an
                              outer optimizer the new theta0 (the outer step from ybar)

for every tensor the round carries (parameters, model buffers, averaged optimizer state), in
the flat buffers' dtype (fp32 for fp16/bf16 tensors), rounded once into the tensor. Step t+tau's
update then applies at the merged point; for ``torch.optim.SGD`` it is fused with the merge.
The merge is one pass per bucket: the correction buffer goes to the round's update rule as a
``MergeRound`` (prsgd_hvd.update_rules), whose kernels read x and the correction and write
x + correction -- or, fused, that point's SGD step -- once (csrc/common.h, NOTE: [Accumulate]).

A delayed round has two phases. *Settle*: wait for the sums, check them (identity, layout,
non-finite policy), compute c -- the outer step, the anchor and the wire format's state move on
here -- and keep the correction ``c - x_sent`` in the averager's sent buffers; the round is
counted. *Merge*: x += correction, in one pass (above). Settling happens at the merge, or earlier
when something needs the round finished: ``state_dict()`` (the checkpoint carries each
correction and the step it merges at, so a resumed job merges it exactly once), and
``average_now()`` / ``finalize()``, which merge every round in flight first (the local progress
is kept) and then take their own rounds at once. The schedule hears of a delayed round when it
starts (an epoch ends when its round starts), with no measured divergence.

*Fragments.* The parameters are split into F fragments of about equal bytes (whole tensors, in
param-group order: the same split on every rank; a tensor opens fragment p+1 when its middle
byte lies past fragment p's share of the bytes), each with its own averager (collective names,
layout, anchor, wire state; an outer optimizer's state is per tensor). Fragment p is averaged
before the update of the steps t with (t - p*I/F) mod I == 0 (Algorithm 1), or after the
update of the (p*K/F)-th step of each epoch of K steps (Algorithms 2 and 3; fragment 0 at the
epoch's end), delayed by tau like any round: each fragment is averaged once per interval or
epoch, the rounds spread over it (NOTE: [fragment rounds] in prsgd_hvd.fragments). Model
buffers ride with fragment 0, averaged optimizer state with its parameter. Warm-up rounds,
``average_now()`` and ``finalize()``'s rounds take every fragment, at once. With F > 1 the
optimizer's own update runs for every parameter (``step()``), never fused into one fragment.

The split and each step's fragment rounds: prsgd_hvd.fragments; the rounds in flight in a
checkpoint: prsgd_hvd.streaming_checkpoint. What cannot stream, and why, is refused at
construction (prsgd_hvd.streaming_checks).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List

import torch

from .averaging import Round, RoundId
from .delayed_round import DelayedRound
from .fragments import Fragments
from .schedules import StepPlan
from .streaming_checkpoint import InFlightCheckpoint
from .update_rules import MergeRound

if TYPE_CHECKING:  # pragma: no cover
    from .local_sgd import LocalSGD


class Streaming:
    """The rounds of one optimizer with ``delay`` and/or ``fragments`` (NOTE: [streaming])."""

    def __init__(self, engine: "LocalSGD"):
        self.e = engine
        self.delay, self.fragments = engine.config.delay, engine.config.fragments
        self.frags = Fragments(engine)                          # the split, each step's rounds
        self.checkpoint = InFlightCheckpoint(engine, self.frags)  # the state_dict() entry
        self.in_flight: List[DelayedRound] = []                 # oldest first
        # stats(): merges written in one pass (MergeRound), and of those the ones whose pass
        # applied the step's SGD update too (fused).
        self.one_pass_merges = 0
        self.fused_merges = 0

    # ---- the step ------------------------------------------------------------------------------
    def unsettled(self) -> int:
        return sum(1 for r in self.in_flight if not r.settled)

    def step(self, t: int, plan: StepPlan, update: Callable[[], Any], skip_update: bool,
             fusable: bool) -> None:
        e = self.e
        whole = self.fragments == 1
        updated = False
        for r in [r for r in self.in_flight if r.merge_at <= t]:
            follows = whole and fusable and not skip_update and not updated
            updated = self.merge(r, update_follows=follows) or updated
        for p, rplan in self.frags.due(t, plan):
            if rplan.warmup or self.delay == 0:
                # At once, as without streaming (a warm-up round averages every step).
                if whole:
                    updated = e.scheduled_round(t, rplan, update, skip_update, fusable) or updated
                else:
                    e.scheduled_round(t, rplan, None, skip_update, averager=self.frags.averager(p))
            else:
                self.start(p, rplan, t, merge_at=t + self.delay)
        if not updated and not skip_update:
            update()
        # An epoch ends (or, with fragments, reaches a fragment's round): the round of "before
        # step t+1's update", at once without a delay (Algorithms 2 and 3 average after it).
        for p, rplan in self.frags.due_after(t, plan):
            if self.delay == 0:
                e.scheduled_round(t, rplan, None, skip_update, averager=self.frags.averager(p),
                                  report=self.frags.ends_epoch(p))
            else:
                self.start(p, rplan, t, merge_at=t + 1 + self.delay)
        if plan.average_after:
            e.averaged_step = t

    def start(self, p: int, plan: StepPlan, t: int, merge_at: int) -> None:
        e = self.e
        averager = self.frags.averager(p)
        busy = next((r for r in self.in_flight if r.fragment == p), None)
        if busy is not None:
            raise RuntimeError(
                f"DistributedLocalSGD: delay={self.delay}: the round of step {busy.t} "
                f"(merging before step {busy.merge_at}) is still in flight when step {t} starts "
                f"the next round of {'fragment ' + str(p) if self.fragments > 1 else 'the model'}."
                f" The delay must be smaller than the number of steps between two rounds "
                f"(every epoch length of a TimeVarying schedule, every rank's interval of a "
                f"Heterogeneous one); pass a smaller delay")
        tensors, n_params = self.frags.tensors(p)
        identity = RoundId("scheduled", e.rounds + self.unsettled() + 1)
        pending = e.round_stage.start(averager, identity, tensors=tensors, weight=plan.weight,
                                      agree=plan.agree, keep_sent=True)
        self.in_flight.append(DelayedRound(p, averager, identity, t, merge_at, plan, n_params,
                                           pending))
        # The schedule's epoch ends when its round starts (NOTE above); nothing measured yet.
        if self.frags.ends_epoch(p):
            e.planner.on_round(e.clock.report(t, 0.0, e.world.total("wait_seconds"), None, False))

    def settle(self, r: DelayedRound) -> None:
        """Phase 1: the round's sums arrive and become the correction c - x_sent."""
        if r.settled:
            return
        e = self.e
        rnd, _ = e.round_stage.run(r.identity, r.averager, t=r.t, weight=r.plan.weight,
                                   active=True, agree=r.plan.agree, pending=r.pending)
        r.pending = None
        e.divergence = self._correction(rnd, r)
        e.rounds += 1

    @torch.no_grad()
    def _correction(self, rnd: Round, r: DelayedRound) -> float:
        """c into the payload, then sent <- c - sent; the anchor, theta0 and the wire state
        move on as in an immediate round. Returns ||x_sent - ybar||^2 over the parameters."""
        e = self.e
        sent = r.averager.sent
        divergence = 0.0
        for b, k in zip(rnd.buckets, rnd.layout.leading(r.n_params)):
            if k:
                seg = b.segment(0, k)
                mine = sent[b.index][:seg.numel()]
                divergence += float(((mine.double() - seg.double() * rnd.scale) ** 2).sum())
        outer_rules = e.write_stage.outer
        outer = outer_rules.outer if outer_rules is not None and outer_rules.covers(rnd) else None
        if outer is not None:
            outer.step_from(rnd, r.n_params)
        if rnd.anchor is not None and rnd.anchor.kept:
            rnd.anchor.follow(rnd)
            if outer is not None:
                outer.write_anchor(rnd, r.n_params)
        for b in rnd.buckets:
            b.payload.mul_(rnd.scale)
        if outer is not None:
            outer.write_theta(rnd, r.n_params, lambda i: rnd.buckets[i].payload)
        for b in rnd.buckets:
            torch.sub(b.payload, sent[b.index], out=sent[b.index])
        rnd.accept()
        return divergence

    def merge(self, r: DelayedRound, update_follows: bool = False) -> bool:
        """Phase 2 (settling first if needed): x <- x + (c - x_sent). True when the update
        rule applied this step's update too (fused SGD)."""
        self.settle(r)
        self.in_flight.remove(r)
        e = self.e
        if r.saved is not None:
            self.checkpoint.merge_saved(r)
            return False
        rnd = MergeRound.of(r.averager.layout, r.identity, r.averager.sent)
        _, updated = e.write_stage.write(rnd, lambda: 0, update_follows=update_follows)
        self.one_pass_merges += 1
        self.fused_merges += int(updated)
        return updated

    def drain(self) -> None:
        """Merge every round in flight now, oldest first (average_now(), finalize())."""
        while self.in_flight:
            self.merge(self.in_flight[0])

    def discard(self) -> None:
        """Before a checkpoint is loaded: every round in flight is waited for (every rank
        started it) and dropped, merged nowhere; the loaded state brings its own."""
        for r in self.in_flight:
            if not r.settled:
                r.pending.wait()
        self.in_flight.clear()

    def settle_all(self) -> None:
        """Every round in flight settles (waits); they stay in flight, to merge when due."""
        for r in self.in_flight:
            self.settle(r)

    def forget(self) -> None:
        """The world is gone (elastic reset or restore): a round still on the wire is dropped
        without waiting (the state restored or synced after it brings what was committed);
        a settled one keeps its correction, out of the old world's buffers."""
        kept = []
        for r in self.in_flight:
            if r.pending is not None:
                r.pending.abandon()
                continue
            if r.saved is None:
                r.saved = self.checkpoint.corrections(r)
            kept.append(r)
        self.in_flight = kept

    # ---- the checkpoint entry (prsgd_hvd.streaming_checkpoint) ---------------------------------
    def local_state(self) -> List[Dict[str, Any]]:
        """Every round in flight, settled first."""
        self.settle_all()
        return self.checkpoint.entries(self.in_flight)

    def validate_state(self, saved: Any, local_step: int) -> None:
        self.checkpoint.validate(saved, local_step)

    def load_state(self, saved: List[Dict[str, Any]]) -> None:
        self.in_flight = self.checkpoint.rounds(saved)
