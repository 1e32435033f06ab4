"""The outer round in one pass, for ``outer=`` a ``torch.optim.SGD`` (DiLoCo, SlowMo).

:class:`prsgd_hvd.outer.OuterStep` writes an outer round in three passes over the model and
several torch ops per tensor: the average back into the parameters, the pseudo-gradient and the
outer optimizer's own ``step()``, theta0 copied into the parameters (and, with Algorithm 1,
the inner optimizer's ``step()`` after it). When the outer optimizer is exactly
``torch.optim.SGD``, :class:`FusedOuterSgd` does all of it in one pass per bucket
(``ops.unflatten_average_outer_sgd_``): it reads the summed buffer, theta0 and the outer momentum
buffer (and the gradient and inner momentum buffer), and writes theta0, the outer buffer, the
parameters (and the inner buffer), with ``torch.optim.SGD``'s arithmetic on both sides
(the kernels are held to it and to their reference in tests/test_ops_outer.py).

The outer optimizer's state stays torch's own: the buffer the kernel updates is
``outer.opt.state[theta]["momentum_buffer"]``, created at the first outer step as SGD creates
it, so a checkpoint, an unfused round after a fused one (a fallback below), or the outer
optimizer's own ``step()`` all read the same buffer. Hyper-parameters are read from the outer
optimizer's param groups at every round (a schedule may change them), group by group.

It takes a round when (``applies``) every bucket is on a CPU or CUDA device in a dtype the
kernels cover, and the outer optimizer is plain ``torch.optim.SGD`` that the kernel can stand in
for: not ``differentiable``, no Tensor hyper-parameters, no step hooks (its own or global: the
kernel never calls ``step()``, so hooks would silently not run), no GradScaler state. Otherwise
the round is the unfused :class:`OuterStep`'s. The variant with ``fuses_update`` also applies
the inner ``torch.optim.SGD`` update (Algorithm 1's restart ``x = theta0' - lr * G``) when the
pipeline says it follows and the inner fused rule (``FusedAverageSgd.applies``) takes the
round; its inner step is applied to theta0' in fp32 before rounding, as the fused
average+SGD pass applies it to the average.

Non-parameter tensors of the round (model buffers, averaged optimizer state) are only averaged,
and first in each bucket (with ``average_state=True`` they hold the inner momentum buffers,
which the inner step must read averaged). The shared anchor (16-bit deltas' origin) moves as
:class:`OuterStep` moves it: it follows the average, then theta0 replaces it in the parameters'
segments.

With ``outer_device`` (theta0 and the outer buffer in host memory) each run of parameters is
cut into the staged chunks of prsgd_hvd.outer_host (NOTE: [staging the outer step]); the kernel
runs on the chunk's device copies as it runs on the originals, so the bits are the same.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import ops
from .averaging import ALIGN, BucketLayout, Round
from .fused_sgd import FusedAverageSgd
from .outer import OuterOptimizer, OuterRules
from .update_rules import UpdateRule

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HYPER = ("lr", "momentum", "dampening", "weight_decay")

# (outer group, inner group or None, first, last): consecutive tensors of a bucket that share
# both param groups; outer group None: not parameters, only averaged.
Run = Tuple[Optional[int], Optional[int], int, int]


def _has_step_hooks(opt: torch.optim.Optimizer) -> bool:
    from torch.optim import optimizer as torch_optimizer
    return bool(getattr(opt, "_optimizer_step_pre_hooks", None) or
                getattr(opt, "_optimizer_step_post_hooks", None) or
                getattr(torch_optimizer, "_global_optimizer_pre_hooks", None) or
                getattr(torch_optimizer, "_global_optimizer_post_hooks", None))


def kernel_takes(opt: torch.optim.Optimizer) -> bool:
    """Whether the fused kernel computes exactly what ``opt.step()`` would (see module doc)."""
    if type(opt) is not torch.optim.SGD or _has_step_hooks(opt):
        return False
    if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
        return False
    for group in opt.param_groups:
        if group.get("differentiable", False):
            return False
        if any(torch.is_tensor(group[k]) for k in _HYPER):
            return False
    return True


class FusedOuterSgd(UpdateRule):
    """An outer round (``outer=torch.optim.SGD``) in one pass per bucket; with ``inner`` (the
    fused average+SGD rule of the inner ``torch.optim.SGD``) also this step's inner update."""

    def __init__(self, outer: OuterOptimizer, inner: Optional[FusedAverageSgd],
                 counted: Callable[[bool], None]):
        self.outer, self.inner = outer, inner
        self.fuses_update = inner is not None
        self._counted = counted  # told after every round it wrote (stats())
        self._n_params = 0
        self._runs_for: Optional[BucketLayout] = None
        self._runs: List[List[Run]] = []

    def applies(self, rnd: Round) -> bool:
        for b in rnd.buckets:
            if b.tensors and (b.device.type not in ("cpu", "cuda") or b.dtype not in _DTYPES):
                return False
        if not kernel_takes(self.outer.opt):
            return False
        return self.inner is None or self.inner.applies(rnd)

    def runs(self, layout: BucketLayout, n_params: int) -> List[List[Run]]:
        """Per bucket, its runs, the non-parameters' first (module doc). Once per layout."""
        if layout is not self._runs_for:
            outer_group: Dict[int, int] = {}
            for gi, group in enumerate(self.outer.opt.param_groups):
                for th in group["params"]:
                    outer_group.setdefault(id(th), gi)
            inner_group: Dict[int, int] = {}
            if self.inner is not None:
                for gi, group in enumerate(self.inner.opt.param_groups):
                    for p in group["params"]:
                        inner_group.setdefault(id(p), gi)
            self._runs = []
            for b in layout.buckets:
                runs: List[Run] = []
                for i, (t, pos) in enumerate(zip(b.tensors, b.positions)):
                    key = (outer_group[id(self._theta_of(t))], inner_group.get(id(t))) \
                        if pos < n_params else (None, None)
                    if runs and runs[-1][:2] == key:
                        runs[-1] = (*key, runs[-1][2], i + 1)
                    else:
                        runs.append((*key, i, i + 1))
                self._runs.append(sorted(runs, key=lambda run: run[0] is not None))
            self._runs_for = layout
        return self._runs

    @torch.no_grad()
    def apply(self, rnd: Round, measured: int) -> float:
        o = self.outer
        o.check_layout(rnd, measured)
        if not o.started:  # a round before the first step (average_now() at once)
            o.start()
        divergence = 0.0
        if o.host is not None:
            o.host.begin_round()
        for b, runs in zip(rnd.buckets, self.runs(rnd.layout, measured)):
            acc = torch.zeros(1, dtype=torch.float64, device=b.device)
            for og, ig, first, last in runs:
                if og is None:
                    ops.unflatten_average_(b.segment(first, last), b.tensors[first:last],
                                           scale=rnd.scale, align=ALIGN)
                    continue
                # outer_device: theta0 and the outer buffer staged chunk by chunk (NOTE:
                # [staging the outer step]); the kernel runs on the copies as on the originals.
                for a, z in self._chunks(first, last, b):
                    slots = [(b, j) for j in range(a, z)]
                    with o.staged(slots, b.device if o.host is not None else None):
                        self._step_run(og, ig, b.segment(a, z), b.tensors[a:z], rnd.scale, acc)
            divergence += float(acc)
        if o.host is not None:
            o.host.end_round()
        self._n_params = measured
        self._counted(self.fuses_update)
        return divergence

    def _chunks(self, first: int, last: int, b) -> List[Tuple[int, int]]:
        """A run of parameters as the kernel takes it: whole, or in the staged chunks of
        ``outer_device``."""
        if self.outer.host is None:
            return [(first, last)]
        return [(first + a, first + z) for a, z in self.outer.host.split(b.tensors[first:last])]

    def _theta_of(self, param: torch.Tensor) -> torch.Tensor:
        """theta0 of a parameter, by identity: a round may carry some parameters only
        (fragments=, prsgd_hvd.streaming), so positions in it are not positions in theta."""
        return self.outer.theta[self.outer._index[id(param)]]

    def _step_run(self, og: int, ig: Optional[int], flat, params, scale, acc) -> None:
        o = self.outer
        group = o.opt.param_groups[og]
        thetas = [self._theta_of(p) for p in params]
        outer_bufs, outer_firsts = _momentum_buffers(o.opt, group, thetas, thetas)
        grads, bufs, firsts, inner_kw = None, None, False, {}
        if self.inner is not None and ig is not None:
            inner = self.inner.opt.param_groups[ig]
            grads = [p.grad for p in params]
            bufs, firsts = _momentum_buffers(self.inner.opt, inner, params, grads)
            inner_kw = dict(_hyper(inner), nesterov=bool(inner["nesterov"]),
                            maximize=bool(inner.get("maximize", False)))
        ops.unflatten_average_outer_sgd_(
            flat, params, thetas, outer_bufs, grads, bufs, scale=scale,
            **{"outer_" + k: v for k, v in _hyper(group).items()},
            outer_nesterov=bool(group["nesterov"]),
            outer_maximize=bool(group.get("maximize", False)), outer_first_step=outer_firsts,
            first_step=firsts, divergence=acc, align=ALIGN, **inner_kw)

    def advance_anchor(self, rnd: Round) -> None:
        """As OuterStep's: the anchor follows the round, then theta0 in the parameters' part."""
        super().advance_anchor(rnd)
        self.outer.write_anchor(rnd, self._n_params)


def _hyper(group: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(group[k]) for k in _HYPER}


def _momentum_buffers(opt: torch.optim.Optimizer, group, tensors, grads):
    """torch.optim.SGD's momentum buffers of ``tensors`` (those with a grad), created on the
    first step as SGD creates them, in its own state; and which were just created."""
    bufs: List[Optional[torch.Tensor]] = []
    firsts: List[bool] = []
    momentum = float(group["momentum"])
    for t, g in zip(tensors, grads):
        buf, first = None, False
        if g is not None and momentum != 0:
            state = opt.state[t]
            buf = state.get("momentum_buffer")
            if buf is None:  # the first step: the kernel writes it as the gradient itself
                buf = torch.empty_like(t, memory_format=torch.preserve_format)
                state["momentum_buffer"] = buf
                first = True
        bufs.append(buf)
        firsts.append(first)
    return bufs, firsts


class FusedOuterRules(OuterRules):
    """OuterRules whose outer rounds take the fused rule where it applies (with the inner
    update where that follows and can be fused), the unfused OuterStep otherwise."""

    def __init__(self, outer: OuterOptimizer, kernels, whole_set_anchors: Callable[[], Any],
                 inner: Optional[FusedAverageSgd]):
        super().__init__(outer, kernels, whole_set_anchors)
        self.fused_rounds = 0    # outer rounds the fused rule wrote (stats())
        self.fused_updates = 0   # of which it applied the inner update too
        self.fused_step = FusedOuterSgd(outer, None, self._count)
        self.fused_step_update = FusedOuterSgd(outer, inner, self._count) \
            if inner is not None else None

    def _count(self, with_update: bool) -> None:
        self.fused_rounds += 1
        self.fused_updates += int(with_update)

    def rule_for(self, rnd: Round, update_follows: bool) -> UpdateRule:
        if update_follows and self.fused_step_update is not None and \
                self.fused_step_update.applies(rnd):
            return self.fused_step_update
        if self.fused_step.applies(rnd):
            return self.fused_step
        return self.step_rule


def outer_rules(outer: OuterOptimizer, kernels, whole_set_anchors: Callable[[], Any],
                fused: bool, inner: Optional[FusedAverageSgd]) -> OuterRules:
    """The write stage's rules for ``outer=``: fused where the compiled kernels are in use
    (``fused=False`` keeps every round on the unfused reference path).

    LocalSGD passes ``fused=False`` for streaming jobs (``delay=``/``fragments=``): there a
    training rank takes a delayed round's outer step in Streaming's correction, with torch's
    ``step()``, while a rank in ``finalize()`` answers the same round through the write stage;
    both must compute theta0 with the same arithmetic, or finalize() would leave the ranks a few
    ulps apart (the kernel rounds ``a + alpha * b`` twice where torch's CPU ``add`` fuses it)."""
    if fused and ops.has_extension():
        return FusedOuterRules(outer, kernels, whole_set_anchors, inner)
    return OuterRules(outer, kernels, whole_set_anchors)
