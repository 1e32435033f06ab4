"""``fragments=F``: the model in F fragments, and which fragment's round each step makes.

The parameters are split into F fragments of about equal bytes: whole tensors, in param-group
order, a tensor opening fragment p+1 when its middle byte lies past fragment p's share of the
bytes (the same split on every rank). Fragment p's tensors are its parameters (fragment 0 also
carries the model buffers) and the averaged optimizer state of its parameters; its rounds run
on its own averager (prsgd_hvd.world). A warm-up round takes every fragment (NOTE: [streaming]).

NOTE: [fragment rounds]
Each fragment is averaged once per interval or epoch, the rounds spread evenly over it:

* Algorithm 1 (interval I): fragment p before the update of the steps t with
  (t - p*I/F) mod I == 0 -- fragment 0 where the whole model would be averaged.
* Algorithms 2 and 3 (epochs of K steps: K^s of the epoch, or this rank's I_i): fragment p
  after the update of the epoch's (p*K/F)-th step, fragment 0 after its last step, where the
  whole model's round would be; K must be a multiple of F. Only fragment 0's round ends the
  epoch (the schedule hears of it); the others take the epoch's weight (Algorithm 3's
  ``weights="steps"``: K, which for fragment p is p*K/F steps scaled alike on every rank).

So within an epoch every rank makes the fragment rounds in the order 1, 2, ..., F-1, 0, whatever
its K -- the order in which a rank that has finished answers them (``walk``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple

import torch

from .averaging import Averager
from .schedules import AVERAGE_BEFORE, StepPlan, _Epochs

if TYPE_CHECKING:  # pragma: no cover
    from .local_sgd import LocalSGD


class Fragments:
    def __init__(self, engine: "LocalSGD"):
        self.e = engine
        self.fragments = engine.config.fragments
        # fragments > 1 is validated to come with a FixedInterval or an epoch schedule (behind
        # an optional warm-up): one of these two is set.
        schedule = engine.config.schedule
        self.interval = getattr(schedule, "interval", None)
        self.epochs: Optional[_Epochs] = schedule if isinstance(schedule, _Epochs) else None
        self._split_key: Optional[Tuple] = None
        self._split: List[List[torch.Tensor]] = []

    def split(self) -> List[List[torch.Tensor]]:
        """The parameters in F fragments of about equal bytes (whole tensors, in order)."""
        params = self.e.contents.params()
        key = tuple((id(p), p.numel() * p.element_size()) for p in params)
        if key != self._split_key:
            if len(params) < self.fragments:
                raise ValueError(
                    f"DistributedLocalSGD: fragments={self.fragments} but the optimizer has only "
                    f"{len(params)} parameter tensors; a fragment is made of whole tensors. Use "
                    f"fragments <= {len(params)}")
            sizes = [nbytes for _, nbytes in key]
            total, F = sum(sizes), self.fragments
            out: List[List[torch.Tensor]] = [[] for _ in range(F)]
            done, p = 0, 0
            for i, (t, nbytes) in enumerate(zip(params, sizes)):
                # A tensor opens the next fragment when its middle byte lies past fragment
                # p's share (total * (p+1) / F), or when each fragment still to fill needs one.
                left = len(params) - i
                if out[p] and p < F - 1 and (done + nbytes / 2 > total * (p + 1) / F or
                                             left <= F - 1 - p):
                    p += 1
                out[p].append(t)
                done += nbytes
            self._split, self._split_key = out, key
        return self._split

    def averager(self, p: int) -> Averager:
        return self.e.world.fragment_averagers[p]

    def tensors(self, p: int) -> Tuple[List[torch.Tensor], int]:
        """Fragment p's tensors (its parameters, fragment 0 the model buffers too, then the
        averaged state of its parameters) and how many are parameters. Collective with
        ``average_state`` (prsgd_hvd.round_contents)."""
        e = self.e
        if self.fragments == 1:
            return e.contents.tensors(e.world.collectives)
        return e.contents.tensors(self.averager(p).collectives, params=self.split()[p],
                                  buffers=(p == 0))

    def tensors_for(self, averager: Averager) -> Tuple[List[torch.Tensor], int]:
        return self.tensors(self.e.world.fragment_averagers.index(averager))

    def due(self, t: int, plan: StepPlan) -> List[Tuple[int, StepPlan]]:
        """The rounds before the update of step t: (fragment, plan)."""
        if plan.warmup:
            return [(p, plan) for p in range(self.fragments)]
        if self.fragments == 1:
            return [(0, plan)] if plan.average_before else []
        if self.epochs is not None:  # their rounds come after the update (due_after)
            return []
        step = self.interval // self.fragments
        if t % step:
            return []
        return [((t // step) % self.fragments, AVERAGE_BEFORE)]

    def due_after(self, t: int, plan: StepPlan) -> List[Tuple[int, StepPlan]]:
        """The rounds after the update of step t (Algorithms 2 and 3): (fragment, plan)."""
        if self.fragments == 1 or self.epochs is None or plan.warmup:
            return [(0, plan)] if plan.average_after else []
        p = self._epoch_fragment(t)
        if p is None:
            return []
        if p == 0:
            return [(0, plan)]  # the epoch's own round: it ends the epoch
        return [(p, StepPlan(average_after=True, weight=self.epochs.epoch_end_plan().weight))]

    def ends_epoch(self, p: int) -> bool:
        """Whether fragment p's round is the schedule's own (it hears of it): always with an
        interval, only fragment 0's with epochs (NOTE: [fragment rounds])."""
        return self.epochs is None or p == 0

    def _epoch_fragment(self, t: int) -> Optional[int]:
        """The fragment whose round follows the update of step t of the current epoch."""
        K, F = self.epochs.epoch_steps(), self.fragments
        if K % F:
            raise ValueError(
                f"DistributedLocalSGD: fragments={F} must divide every epoch's length (the "
                f"fragments' rounds are K/F steps apart), but epoch {self.epochs.epoch} of "
                f"{self.epochs!r} has {K} steps on rank {self.epochs.rank}; give epoch lengths "
                f"(or intervals) that are multiples of {F}, or fragments=1")
        k = self.epochs.in_epoch(t)
        return None if k % (K // F) else (k // (K // F)) % F

    def walk(self, t: int) -> Iterator[Averager]:
        """The fragment rounds the ranks still training make from step ``t`` on, in order (the
        join protocol answers them)."""
        if self.epochs is None:
            while True:
                plan = self.e.planner.plan(t)
                yield from (self.averager(p) for p, _ in self.due(t, plan))
                t += 1
        k = self.epochs.in_epoch(t - 1)  # steps this rank took in its last epoch
        while t <= self.e.config.warmup_steps:  # the warm-up's rounds, every fragment each step
            yield from (self.averager(p) for p in range(self.fragments))
            t, k = t + 1, 0
        # The cycle 1, ..., F-1, 0 of every epoch, from the round after this rank's last one.
        # (k = 0: a new epoch, whose length the schedule may not know -- a sequence run out)
        p = 1 if k == 0 else k // (self.epochs.epoch_steps() // self.fragments) + 1
        while True:
            yield self.averager(p % self.fragments)
            p += 1
