"""Kernel 2 of an Algorithm 1 round for ``torch.optim.SGD``: average and step in one pass.

``x_i <- avg(x^{t-1}) - lr * update(G_i^t)`` reads the summed buffer, the gradient and the
momentum buffer and writes the parameter and the buffer once (``ops.unflatten_average_sgd_``),
instead of writing the average back and letting ``SGD.step()`` read it again. The arithmetic is
exactly ``torch.optim.SGD``'s (the kernels are held to it), applied per param group with that
group's hyper-parameters; tensors of the round that are not parameters (model buffers,
optimizer state) are only averaged. An update rule of the round's write stage
(NOTE: [update rules] in prsgd_hvd.update_rules); its reference is ``ops_reference``'s
``unflatten_average_sgd_`` and, end to end, the float64 trajectories of the tests.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from . import ops
from .averaging import ALIGN, BucketLayout, Round
from .update_rules import UpdateRule

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Run = Tuple[Optional[int], int, int]  # (param group index or None, first, last) in a bucket


class FusedAverageSgd(UpdateRule):
    """The fused average+SGD write-back for one ``torch.optim.SGD``."""

    fuses_update = True
    needs_measured = False  # it knows the parameters: the param-group runs

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.opt = optimizer
        self._runs_for: Optional[BucketLayout] = None
        self._runs: List[List[Run]] = []

    def applies(self, rnd: Round) -> bool:
        """The kernels cover the round's devices and dtypes and the optimizer's options."""
        for b in rnd.buckets:
            if b.tensors and (b.device.type not in ("cpu", "cuda") or b.dtype not in _FUSED_DTYPES):
                return False
        for group in self.opt.param_groups:
            if group.get("differentiable", False):
                return False
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    return False
        return True

    def runs(self, layout: BucketLayout) -> List[List[Run]]:
        """Per bucket: consecutive tensors of one param group (or of none), as runs, the runs
        of non-parameters (group None) first: with average_state=True they hold the momentum
        buffers, which must be averaged before the step reads them (the order of "average,
        then this step's update" that the unfused path has). Built once per layout."""
        if layout is not self._runs_for:
            group_of: Dict[int, int] = {}
            for gi, group in enumerate(self.opt.param_groups):
                for p in group["params"]:
                    group_of.setdefault(id(p), gi)
            self._runs = []
            for b in layout.buckets:
                runs: List[Run] = []
                for i, t in enumerate(b.tensors):
                    g = group_of.get(id(t))
                    if runs and runs[-1][0] == g:
                        runs[-1] = (g, runs[-1][1], i + 1)
                    else:
                        runs.append((g, i, i + 1))
                self._runs.append(sorted(runs, key=lambda run: run[0] is not None))
            self._runs_for = layout
        return self._runs

    @torch.no_grad()
    def apply(self, rnd: Round, measured: int = 0) -> Optional[float]:
        """Average every tensor of ``rnd`` and step the parameters; returns this rank's squared
        distance from the average over the parameters (measured in the same pass).

        A delayed merge (update_rules.MergeRound) adds its correction to every tensor and
        steps the parameters from there, in the same one pass (``accumulate``); it measures
        nothing (its round's divergence was taken when it settled) and returns None."""
        accumulate = rnd.accumulate
        divergence = None if accumulate else 0.0
        for b, runs in zip(rnd.buckets, self.runs(rnd.layout)):
            acc = None if accumulate else torch.zeros(1, dtype=torch.float64, device=b.device)
            for g, first, last in runs:  # non-parameters first (see runs())
                flat, tensors = b.segment(first, last), b.tensors[first:last]
                if g is None:
                    ops.unflatten_average_(flat, tensors, scale=rnd.scale, align=ALIGN,
                                           accumulate=accumulate)
                else:
                    self._step_group(self.opt.param_groups[g], flat, tensors, rnd.scale, acc,
                                     accumulate)
            if acc is not None:
                divergence += float(acc)
        return divergence

    def _step_group(self, group, flat, params, scale, acc, accumulate) -> None:
        momentum = float(group["momentum"])
        grads, bufs, firsts = [], [], []
        for p in params:
            grads.append(p.grad)
            buf, first = None, False
            if p.grad is not None and momentum != 0:
                state = self.opt.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:  # torch.optim.SGD's first step: the buffer starts as the grad
                    buf = torch.empty_like(p, memory_format=torch.preserve_format)
                    state["momentum_buffer"] = buf
                    first = True
            bufs.append(buf)
            firsts.append(first)
        ops.unflatten_average_sgd_(
            flat, params, grads, bufs, scale=scale, lr=float(group["lr"]), momentum=momentum,
            dampening=float(group["dampening"]), weight_decay=float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]), maximize=bool(group.get("maximize", False)),
            first_step=firsts, divergence=acc, align=ALIGN, accumulate=accumulate)
