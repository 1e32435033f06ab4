"""``fragments=F``: the model in F fragments, and which fragment's round each step makes.

The parameters are split into F fragments of about equal bytes: whole tensors, in param-group
order, a tensor opening fragment p+1 when its middle byte lies past fragment p's share of the
bytes (the same split on every rank). Fragment p's tensors are its parameters (fragment 0 also
carries the model buffers) and the averaged optimizer state of its parameters; its rounds run
on its own averager (prsgd_hvd.world). Fragment p is averaged before the update of the steps t
with (t - p*I/F) mod I == 0; a warm-up round takes every fragment (NOTE: [streaming]).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from .averaging import Averager
from .schedules import AVERAGE_BEFORE, StepPlan

if TYPE_CHECKING:  # pragma: no cover
    from .local_sgd import LocalSGD


class Fragments:
    def __init__(self, engine: "LocalSGD"):
        self.e = engine
        self.fragments = engine.config.fragments
        # fragments > 1 is validated to come with a FixedInterval (behind an optional warm-up).
        self.interval = getattr(engine.config.schedule, "interval", None)
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
        step = self.interval // self.fragments
        if t % step:
            return []
        return [((t // step) % self.fragments, AVERAGE_BEFORE)]

    def rounds_at(self, t: int) -> List[Averager]:
        """Every round step t makes, in order (the join protocol's walk)."""
        plan = self.e.planner.plan(t)
        out = [self.averager(p) for p, _ in self.due(t, plan)]
        if plan.average_after:
            out.append(self.averager(0))
        return out
