"""The 'write' stage of a round: what a completed round makes of the tensors it averaged.

NOTE: [update rules]
Between "the sums have arrived and every check passed" and "the step goes on" a round is handed
to one update rule. A rule gets the completed :class:`~prsgd_hvd.averaging.Round`:

    rnd.buckets[i].payload   the flat sum over ranks of weight_r * x_r (one buffer per
                             (device, dtype), tensors in order; rnd.layout has the segments)
    rnd.scale                1 / (sum of the weights): payload * scale is the average
    rnd.anchor               the common point of the last accepted round (NOTE: [the anchor]),
                             kept when a stage asked for it (``needs_anchor``)

and writes every tensor of the round, in one pass where a kernel exists. It returns this rank's
squared distance from the average over the first ``measured`` tensors (the parameters) when it
measures it in the same pass, and it moves the anchor (``advance_anchor``). A rule with
``fuses_update`` also applies this step's optimizer update (Algorithm 1's update after the
average), so the pipeline skips the optimizer's own ``step()``.

Rules here: :class:`PlainAverage` (``tensor = sum * scale``, kernel ``unflatten_average_``,
reference in ops_reference) and ``prsgd_hvd.fused_sgd.FusedAverageSgd`` (average and
``torch.optim.SGD``'s update, kernel ``unflatten_average_sgd_``). :class:`WriteStage` picks one
per round; it is the only place that knows which rules exist.

A delayed merge (NOTE: [streaming] in prsgd_hvd.streaming) reaches the rules as a
:class:`MergeRound`: its buckets hold the correction c - x_sent, and both rules add it to the
tensors (the kernels' ``accumulate=True``, scale 1) instead of overwriting them, so a merge is
one pass over each bucket -- with ``torch.optim.SGD`` the pass of the next step's update.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .averaging import ALIGN, Bucket, BucketLayout, Round, RoundId
from .schedules import StepPlan


class MergeRound(Round):
    """x <- x + (c - x_sent) for every tensor of a delayed round, as a round the update rules
    write: this rank's alone (scale 1, no anchor), its buckets reading the correction buffers
    (the averager's ``sent``, one per bucket, laid out as the payload), written in the kernels'
    accumulate mode (csrc/common.h, NOTE: [Accumulate]). The result is bit for bit what packing
    x, adding the correction and writing that sum back gave in three passes."""

    accumulate = True  # the rules add the payload to the tensors (Round.accumulate)

    @classmethod
    def of(cls, layout: BucketLayout, identity: RoundId,
           corrections: List[torch.Tensor]) -> "MergeRound":
        rnd = cls.local(layout, identity)
        rnd.buckets = [Bucket(b.index, b.device, b.dtype, b.tensors, b.positions, c, b.offsets)
                       for b, c in zip(layout.buckets, corrections)]
        return rnd

    @torch.no_grad()
    def write_back(self, kernels, measured: int = 0) -> Optional[float]:
        """``tensor += correction`` for every tensor: PlainAverage's kernel in accumulate mode.
        A merge measures nothing (the merge asks for no parameters: its round's divergence was
        taken when it settled)."""
        for b in self.buckets:
            if b.tensors:
                kernels.unflatten_average_(b.payload, b.tensors, scale=self.scale, align=ALIGN,
                                           accumulate=True)
        return None


class UpdateRule:
    """One way to write a completed round back (NOTE: [update rules])."""

    fuses_update = False   # write() applies this step's optimizer update too
    needs_anchor = False   # the averagers must keep the anchor for this rule
    needs_measured = True  # wants the number of parameters (a rule that knows them says no)

    def applies(self, rnd: Round) -> bool:
        """Whether this rule can write ``rnd`` (devices, dtypes, optimizer options)."""
        return True

    def write(self, rnd: Round, measured: int) -> Optional[float]:
        divergence = self.apply(rnd, measured)
        self.advance_anchor(rnd)
        return divergence

    def apply(self, rnd: Round, measured: int) -> Optional[float]:
        raise NotImplementedError

    def advance_anchor(self, rnd: Round) -> None:
        """The plain rules leave every rank at the average: that is the new common point.
        A rule whose kernel computes another common point writes the anchor itself."""
        if rnd.anchor is not None and rnd.anchor.kept:
            rnd.anchor.follow(rnd)


class PlainAverage(UpdateRule):
    """``tensor = sum * scale`` for every tensor of the round (kernel 2 of the plain round)."""

    def __init__(self, kernels):
        self.kernels = kernels  # prsgd_hvd.ops, or ops_reference for fused=False

    def apply(self, rnd: Round, measured: int) -> Optional[float]:
        return rnd.write_back(self.kernels, measured=measured)


class WriteStage:
    """Picks the update rule of each round: the fused one when this step's update follows the
    average and the fused rule can take the round, otherwise the plain average (after which the
    pipeline runs the optimizer's own update).

    ``choose`` sees the round (its identity, its averager's anchor) and the plan that asked for
    it (``None`` for ``average_now()`` and ``finalize()``'s rounds): a rule that applies only to
    some rounds -- an outer step on full rounds but not on warm-up (``plan.warmup``) or group
    rounds (``plan.group``) -- is chosen here, and nowhere else."""

    def __init__(self, average: UpdateRule, fused: Optional[UpdateRule] = None, outer=None):
        # outer: prsgd_hvd.outer.OuterRules (outer=F); it takes every round over the whole
        # process set -- warm-up rounds as plain averages theta0 follows, the others with its
        # rule_for() (prsgd_hvd.fused_outer: the fused outer round, with the inner update when
        # it follows) -- before the fused rule is asked: the outer step is never bypassed.
        self.average, self.fused, self.outer = average, fused, outer

    @property
    def needs_anchor(self) -> bool:
        return any(r is not None and r.needs_anchor for r in (self.average, self.fused))

    def choose(self, rnd: Round, update_follows: bool,
               plan: Optional[StepPlan] = None) -> UpdateRule:
        if self.outer is not None and self.outer.covers(rnd):
            return self.outer.follow_rule if plan is not None and plan.warmup \
                else self.outer.rule_for(rnd, update_follows)
        if update_follows and self.fused is not None and self.fused.applies(rnd):
            return self.fused
        return self.average

    def write(self, rnd: Round, n_params: Callable[[], int], update_follows: bool = False,
              plan: Optional[StepPlan] = None):
        """Write ``rnd`` back; returns (divergence, whether the update was applied too).
        ``n_params()``: how many of the round's first tensors are parameters (asked only by
        rules that need it: listing the parameters costs microseconds per round)."""
        rule = self.choose(rnd, update_follows, plan)
        divergence = rule.write(rnd, n_params() if rule.needs_measured else 0)
        rnd.accept()
        return divergence, rule.fuses_update
