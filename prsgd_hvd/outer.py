"""Outer optimizers (``outer=F``: DiLoCo, Lookahead-style slow steps) as update rules.

The semantics (DESIGN.md section 3, README "Outer optimizers"):

* the anchor theta0 is the model after the last round over the whole process set, initially
  the parameters at the first ``step()`` (the broadcast x^0);
* a round over the whole set computes the (weighted) average ybar as every round does, sets the
  pseudo-gradient ``theta0 - ybar`` as ``.grad`` of the outer optimizer's tensors (which hold
  theta0), calls the outer optimizer's own ``step()``, and theta0 <- its result; every rank's
  parameters <- theta0. The pipeline then runs the inner optimizer's own update where the
  schedule puts one after the round (Algorithm 1: x = theta0 - lr * G);
* warm-up rounds are plain averages and theta0 follows them; rounds within a ``Hierarchical``
  group are plain averages of the group and leave theta0 alone (it is the whole set's point);
* only parameters take the outer step: model buffers and averaged optimizer state are averaged.

The outer optimizer's tensors are per-parameter copies of theta0 on the parameter's device, in
the round's flat dtype (fp32 for fp16/bf16 parameters), so the outer arithmetic is that of
``torch.optim`` in fp32. This module's rule is the unfused one: it averages with the round's
write-back kernel, then does the outer step with torch ops per tensor. For ``torch.optim.SGD``
as the outer optimizer prsgd_hvd.fused_outer does the whole round in one kernel pass.

With 16-bit deltas the wire encodes ``x_i - anchor`` (prsgd_hvd.anchor): after an outer round
the rule writes theta0 into the shared anchor's parameter segments, so the deltas are taken
from theta0, the point every rank restarted from.

With ``outer_device`` (prsgd_hvd.outer_host) theta0 and the outer optimizer's state live there
(host memory) instead, and both rules take the round's parameters in staged chunks
(:meth:`OuterOptimizer.chunks`, :meth:`OuterOptimizer.staged`): NOTE: [staging the outer step].
``slowmo(opt, ...)`` builds prsgd_hvd.slowmo.SlowMo, SlowMo's exact update.
"""
from __future__ import annotations

import contextlib
import inspect
import numbers
from typing import Any, Callable, Dict, List, Optional

import torch

from .averaging import Round, flat_dtype_for
from .outer_host import HostPlacement
from .slowmo import SlowMo, inner_lr_of
from .update_rules import UpdateRule

_EXAMPLE = "outer=lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)"


def diloco(lr: float = 0.7, momentum: float = 0.9) -> Callable[[List[torch.Tensor]], torch.optim.Optimizer]:
    """DiLoCo's outer optimizer (Douillard et al. 2023): SGD with Nesterov momentum on the
    pseudo-gradient. ``outer=prsgd_hvd.outer.diloco()``."""
    return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, nesterov=True)


_UNSET = object()


def slowmo(inner: Any = None, slowmo_lr: Any = _UNSET,
           slowmo_momentum: Any = _UNSET) -> Callable[[List[torch.Tensor]], torch.optim.Optimizer]:
    """SlowMo's slow momentum (Wang et al., ICLR 2020) as the outer optimizer.

    ``outer=prsgd_hvd.outer.slowmo(opt, slowmo_lr=1.0, slowmo_momentum=0.5)``, ``opt`` the inner
    optimizer (the one being wrapped) or a callable returning the inner learning rate gamma:
    SlowMo's Algorithm 1 exactly, also when gamma changes (schedulers, Algorithm 2's epoch
    rates): u <- beta*u + (theta0 - ybar)/gamma, theta0 <- theta0 - alpha*gamma*u, with gamma
    read at every outer step (prsgd_hvd.slowmo.SlowMo, a torch optimizer; its rounds take the
    unfused outer step). The inner optimizer's groups must then share one learning rate.

    ``slowmo(slowmo_lr=1.0, slowmo_momentum=0.5)`` (no inner optimizer; also
    ``slowmo(1.0, 0.5)``): the first form, ``torch.optim.SGD(lr=slowmo_lr,
    momentum=slowmo_momentum)`` on the pseudo-gradient, whose buffer is gamma*u: SlowMo exactly
    only while gamma is constant (SlowMo rescales by gamma_old/gamma_new when it changes, this
    does not); it takes the fused outer kernel. (slowmo_lr=1, slowmo_momentum=0 is plain
    PR-SGD in both forms.)"""
    if isinstance(inner, numbers.Real) and not isinstance(inner, bool):  # slowmo(alpha, beta)
        if slowmo_lr is not _UNSET and slowmo_momentum is not _UNSET:
            raise TypeError("prsgd_hvd.outer.slowmo: slowmo(slowmo_lr, slowmo_momentum) takes two "
                            "numbers, or slowmo(inner_optimizer, slowmo_lr, slowmo_momentum)")
        inner, slowmo_lr, slowmo_momentum = \
            None, inner, slowmo_lr if slowmo_lr is not _UNSET else slowmo_momentum
    alpha = 1.0 if slowmo_lr is _UNSET else slowmo_lr
    beta = 0.5 if slowmo_momentum is _UNSET else slowmo_momentum
    if inner is None:
        return lambda ps: torch.optim.SGD(ps, lr=alpha, momentum=beta)
    if isinstance(inner, torch.optim.Optimizer):
        gamma = inner_lr_of(inner)
    elif callable(inner):
        gamma = inner
    else:
        raise TypeError(f"prsgd_hvd.outer.slowmo: the first argument must be the inner "
                        f"optimizer or a callable returning its learning rate, got "
                        f"{type(inner).__name__}")
    SlowMo([torch.zeros(1, requires_grad=True)], gamma, lr=alpha, momentum=beta)  # checks them now
    return lambda ps: SlowMo(ps, gamma, lr=alpha, momentum=beta)


def check_factory(factory: Any) -> None:
    """``outer=`` must be a callable list_of_tensors -> Optimizer (checked before anything)."""
    if isinstance(factory, torch.optim.Optimizer):
        raise TypeError(f"DistributedLocalSGD: 'outer' must be a function that builds the outer "
                        f"optimizer over the tensors it is given, not an optimizer "
                        f"({type(factory).__name__}) already built over other tensors; e.g. "
                        f"{_EXAMPLE}")
    if not callable(factory):
        raise TypeError(f"DistributedLocalSGD: 'outer' must be a callable taking a list of "
                        f"tensors and returning a torch.optim.Optimizer over them, got "
                        f"{type(factory).__name__}; e.g. {_EXAMPLE}")


class OuterOptimizer:
    """theta0 (one tensor per parameter) and the outer optimizer over it.

    Built at construction: ``factory`` is called once, on the copies, and its result checked,
    so a bad ``outer=`` raises before the optimizer is wrapped. The factory cannot be changed
    afterwards (there is no API for it: wrap a fresh optimizer instead)."""

    def __init__(self, factory: Callable, params: List[torch.Tensor],
                 device: Optional[torch.device] = None):
        check_factory(factory)
        self.params = list(params)
        # outer_device: theta0 and the outer state in (host) memory there, staged per chunk at
        # each outer round (prsgd_hvd.outer_host); None: beside each parameter.
        self.host = HostPlacement(device) if device is not None else None
        with torch.no_grad():
            if self.host is None:
                self.theta = [p.detach().to(flat_dtype_for(p.dtype), copy=True)
                              for p in self.params]
            else:
                self.theta = [self.host.empty_like(p, flat_dtype_for(p.dtype)).copy_(p)
                              for p in self.params]
        opt = factory(list(self.theta))
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"DistributedLocalSGD: 'outer' returned {type(opt).__name__}, not a "
                            f"torch.optim.Optimizer; it must build the optimizer over the list of "
                            f"tensors it is given, e.g. {_EXAMPLE}")
        held = [p for g in opt.param_groups for p in g["params"]]
        given = {id(t) for t in self.theta}
        if len(held) != len(self.theta) or {id(p) for p in held} != given:
            raise ValueError(
                f"DistributedLocalSGD: the optimizer 'outer' returned holds other tensors than the "
                f"{len(self.theta)} it was given ({len(held)} tensors, "
                f"{sum(1 for p in held if id(p) in given)} of them the given ones). Build it over "
                f"exactly the list passed in (outer=lambda ps: Optimizer(ps, ...)), not over the "
                f"model's parameters")
        if isinstance(opt, torch.optim.LBFGS) or _needs_closure(opt):
            raise ValueError(
                f"DistributedLocalSGD: the outer optimizer {type(opt).__name__} needs a closure "
                f"that re-evaluates the loss in step(); the outer step only has the "
                f"pseudo-gradient (theta0 - average), so use a gradient-only optimizer "
                f"(SGD, Adam, ...), e.g. {_EXAMPLE}")
        self.opt = opt
        # Each theta0's place in the outer optimizer's param groups (the staging swaps it).
        self.slot = {id(p): (gi, k) for gi, g in enumerate(opt.param_groups)
                     for k, p in enumerate(g["params"])}
        self.started = False   # theta0 holds x^0 (set at the first step or first round)
        self._checked_layout = None
        # A round may carry some of the parameters only (fragments=F, prsgd_hvd.streaming):
        # its tensors are found by identity, not by position.
        self._index = {id(p): i for i, p in enumerate(self.params)}

    # ---- theta0 -----------------------------------------------------------------------------
    @torch.no_grad()
    def start(self) -> None:
        """theta0 <- the parameters now (x^0: called at the first step, before its update)."""
        for th, p in zip(self.theta, self.params):
            th.copy_(p)
        self.started = True

    def describe(self) -> Dict[str, Any]:
        """What the ranks must agree on: the class and every hyperparameter of every group."""
        return {"class": type(self.opt).__name__,
                "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                 for g in self.opt.param_groups]}

    def check_layout(self, rnd: Round, n_params: int) -> None:
        """The round's parameters are the ones theta0 was built for (once per layout)."""
        if rnd.layout is self._checked_layout:
            return
        tensors = rnd.layout.tensors[:n_params]
        if any(id(t) not in self._index for t in tensors) or len(set(map(id, tensors))) != n_params:
            raise RuntimeError(
                "DistributedLocalSGD: the optimizer's parameters changed since it was wrapped "
                "(add_param_group?); an outer optimizer is built over the parameters at "
                "construction. Add every param group before wrapping with outer=")
        self._checked_layout = rnd.layout

    @staticmethod
    def slots(rnd: Round, n_params: int):
        """(bucket, position in it) of every parameter the round carries."""
        for b in rnd.buckets:
            for j, pos in enumerate(b.positions):
                if pos < n_params:
                    yield b, j

    def averages(self, rnd: Round, n_params: int, slots=None):
        """(index of the parameter, its average ybar as a view of the summed buffer * scale),
        for the round's parameters or for ``slots`` of it only."""
        for b, j in (self.slots(rnd, n_params) if slots is None else slots):
            start = b.offsets[j]
            p = b.tensors[j]
            yield self._index[id(p)], b.flat[start:start + p.numel()].view(p.shape) * rnd.scale

    def chunks(self, rnd: Round, n_params: int):
        """The round's parameters as the outer step takes them: all at once, or with
        ``outer_device`` in staged chunks of one bucket, (the chunk's slots, its device)."""
        if self.host is None:
            yield list(self.slots(rnd, n_params)), None
            return
        for b in rnd.buckets:
            js = [j for j, pos in enumerate(b.positions) if pos < n_params]
            for first, last in self.host.split([b.tensors[j] for j in js]):
                yield [(b, j) for j in js[first:last]], b.device

    def staged(self, slots, device):
        """theta0 and the state of ``slots`` on ``device`` for the block (outer_device), or
        as they are."""
        if device is None:
            return contextlib.nullcontext()
        return self.host.staged(self, [self._index[id(b.tensors[j])] for b, j in slots], device)

    @torch.no_grad()
    def step_from(self, rnd: Round, n_params: int, write_params: bool = False) -> None:
        """The outer step of a round over the whole set: ``theta0 - ybar`` as the ``.grad`` of
        the round's parameters' theta0 (the others keep none, so torch's optimizers skip
        them), then the outer optimizer's own ``step()``; with ``outer_device`` chunk by chunk
        on the round's device (NOTE: [staging the outer step]). Changes theta0, and with
        ``write_params`` the round's parameters <- theta0."""
        self.check_layout(rnd, n_params)
        if not self.started:  # a round before the first step (average_now() at once)
            self.start()
        if self.host is not None:
            self.host.begin_round()
        for slots, device in self.chunks(rnd, n_params):
            with self.staged(slots, device):
                for pos, ybar in self.averages(rnd, n_params, slots):
                    th = self.theta[pos]
                    th.grad = th - ybar  # the pseudo-gradient, in theta0's dtype
                self.opt.step()
                for b, j in slots:
                    th = self.theta[self._index[id(b.tensors[j])]]
                    th.grad = None
                    if write_params:
                        b.tensors[j].copy_(th)
        if self.host is not None:
            self.host.end_round()

    @torch.no_grad()
    def follow(self, rnd: Round, n_params: int) -> None:
        """A warm-up round: theta0 <- the round's average (its parameters)."""
        self.check_layout(rnd, n_params)
        for pos, ybar in self.averages(rnd, n_params):
            self.theta[pos].copy_(ybar)
        self.started = True

    @torch.no_grad()
    def write_anchor(self, rnd: Round, n_params: int) -> None:
        """theta0 into the parameter segments of the shared anchor (the deltas' origin)."""
        anchor = rnd.anchor
        if anchor is None or not anchor.kept or not anchor.ready(len(rnd.buckets)) or \
                not rnd.is_finite():  # only finite rounds move the anchor (NOTE: [the anchor])
            return
        self.write_theta(rnd, n_params, anchor.bucket)

    @torch.no_grad()
    def write_theta(self, rnd: Round, n_params: int, flat_of: Callable[[int], torch.Tensor]) -> None:
        """theta0 into the parameter segments of ``flat_of(bucket index)``, flat buffers laid
        out as the round's (the anchor; a delayed round's common point, prsgd_hvd.streaming)."""
        for b in rnd.buckets:
            flat = flat_of(b.index)
            for j, pos in enumerate(b.positions):
                if pos < n_params:
                    start = b.offsets[j]
                    theta = self.theta[self._index[id(b.tensors[j])]]
                    flat[start:start + b.tensors[j].numel()].copy_(theta.view(-1))

    # ---- the checkpoint entry ----------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"class": type(self.opt).__name__, "started": self.started,
                "anchor": [t.detach().clone() for t in self.theta],
                "optimizer": self.opt.state_dict()}

    def validate_state(self, saved: Any) -> None:
        """Check a saved :meth:`state_dict` whole, changing nothing."""
        if not isinstance(saved, dict) or not {"anchor", "optimizer"} <= set(saved):
            raise ValueError("DistributedLocalSGD: 'local_sgd.outer' must be the dict an outer "
                             "optimizer's state_dict() saved (with 'anchor' and 'optimizer')")
        if saved.get("class") != type(self.opt).__name__:
            raise ValueError(f"DistributedLocalSGD: the checkpoint's outer optimizer is "
                             f"{saved.get('class')}, this job's is {type(self.opt).__name__}; "
                             f"wrap with the outer= the checkpoint was saved with")
        anchor = saved["anchor"]
        if not isinstance(anchor, (list, tuple)) or len(anchor) != len(self.theta) or any(
                not torch.is_tensor(a) or a.shape != t.shape for a, t in zip(anchor, self.theta)):
            raise ValueError(f"DistributedLocalSGD: the checkpoint's outer anchor does not match "
                             f"this optimizer's {len(self.theta)} parameters (shapes); it was "
                             f"saved from another model")
        groups = saved["optimizer"].get("param_groups") if isinstance(saved["optimizer"], dict) else None
        if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != \
                [len(g["params"]) for g in self.opt.param_groups]:
            raise ValueError("DistributedLocalSGD: the checkpoint's outer optimizer state has "
                             "other param groups than this job's outer optimizer")

    @torch.no_grad()
    def load_state(self, saved: Dict[str, Any]) -> None:
        self.opt.load_state_dict(saved["optimizer"])
        for th, a in zip(self.theta, saved["anchor"]):
            th.copy_(a)
        if self.host is not None:  # torch loaded the state beside theta0, but not page-locked
            self.host.pin_state(self.opt)
        self.started = bool(saved.get("started", True))

    def placement(self) -> Dict[str, Any]:
        """Where theta0 and the outer state are (devices as found, not as configured), whether
        the host copies are page-locked, and the last outer round's staging (outer_device)."""
        held = list(self.theta)
        state = [v for st in self.opt.state.values() for k, v in st.items()
                 if torch.is_tensor(v) and k != "step"]
        host = self.host
        return {"outer_device": str(host.device) if host is not None else None,
                "theta": sorted({str(t.device) for t in held}),
                "state": sorted({str(t.device) for t in state}),
                "pinned": all(t.is_pinned() for t in held + state if t.device.type == "cpu"),
                "chunks": host.chunks if host is not None else 0,
                "staged_bytes_max": host.staged_bytes_max if host is not None else 0}


def _needs_closure(opt: torch.optim.Optimizer) -> bool:
    """A step(closure) whose closure has no default cannot be called with the gradient alone."""
    try:
        param = inspect.signature(type(opt).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


class OuterStep(UpdateRule):
    """A round over the whole process set with an outer optimizer (the module doc)."""

    def __init__(self, outer: OuterOptimizer, kernels):
        self.outer, self.kernels = outer, kernels
        self._n_params = 0

    def apply(self, rnd: Round, measured: int) -> Optional[float]:
        o = self.outer
        o.check_layout(rnd, measured)
        if not o.started:  # a round before the first step (average_now() at once): x^0 first
            o.start()
        # Every tensor to its average (buffers and shared state stay there); the divergence
        # is measured against the average in the same pass.
        divergence = rnd.write_back(self.kernels, measured=measured)
        o.step_from(rnd, measured, write_params=True)  # and the round's parameters <- theta0
        self._n_params = measured
        return divergence

    def advance_anchor(self, rnd: Round) -> None:
        """The anchor follows the round (buffers, state), then theta0 replaces the average in
        the parameters' segments: every rank holds theta0 there."""
        super().advance_anchor(rnd)
        self.outer.write_anchor(rnd, self._n_params)


class OuterFollows(UpdateRule):
    """A warm-up round over the whole set: a plain average, and theta0 <- that average."""

    def __init__(self, outer: OuterOptimizer, kernels):
        self.outer, self.kernels = outer, kernels

    def apply(self, rnd: Round, measured: int) -> Optional[float]:
        divergence = rnd.write_back(self.kernels, measured=measured)
        self.outer.follow(rnd, measured)
        return divergence


class OuterRules:
    """What the write stage asks: whether a round is over the whole set, and the two rules."""

    def __init__(self, outer: OuterOptimizer, kernels, whole_set_anchors: Callable[[], Any]):
        self.outer = outer
        self.step_rule = OuterStep(outer, kernels)
        self.follow_rule = OuterFollows(outer, kernels)
        # The anchors of the averagers over the whole set, now (one, or one per fragment).
        self.whole_set_anchors = whole_set_anchors

    def covers(self, rnd: Round) -> bool:
        return any(rnd.anchor is a for a in self.whole_set_anchors())

    def rule_for(self, rnd: Round, update_follows: bool) -> UpdateRule:
        """The rule of an outer (non-warm-up) round; prsgd_hvd.fused_outer's FusedOuterRules
        gives the fused one where it applies."""
        return self.step_rule
