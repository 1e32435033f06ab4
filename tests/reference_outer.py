"""Float64 reference of an outer optimizer (DiLoCo) around Parallel Restarted SGD.

Plain torch only, none of prsgd_hvd's code, straight from README "Outer optimizers": theta0 is
the model after the last round over the whole set (initially x^0); such a round averages the
ranks' models into ybar, gives the outer optimizer (over copies of theta0) the gradient
theta0 - ybar, steps it, and every rank's model becomes theta0. Warm-up rounds are plain
averages that theta0 follows. tests/reference.py calls :func:`outer_round` through its hook.

:class:`SlowMoReference` is SlowMo's own update (Wang et al., ICLR 2020, Algorithm 1), written
from the paper rather than as an optimizer: u <- beta*u + (x0 - xbar)/gamma_t and
x0 <- x0 - alpha*gamma_t*u, with gamma_t the inner learning rate when the outer step runs (the
rate the simulated inner optimizers hold then: README "Outer optimizers").
"""
from __future__ import annotations

import torch


class OuterReference:
    """theta0 and a torch.optim.SGD over it, for one simulated job (all ranks share it)."""

    def __init__(self, models, outer_kwargs):
        self.theta = [p.detach().clone() for p in models[0].parameters()]
        self.opt = torch.optim.SGD(self.theta, **outer_kwargs)

    @torch.no_grad()
    def follow(self, models):
        """A plain (warm-up) round: every model equals the average; theta0 follows it."""
        for th, p in zip(self.theta, models[0].parameters()):
            th.copy_(p)

    def outer_round(self, models):
        """Called right after every model was set to the (weighted) average ybar."""
        with torch.no_grad():
            for th, p in zip(self.theta, models[0].parameters()):
                th.grad = th - p
        self.opt.step()
        with torch.no_grad():
            for m in models:
                for th, p in zip(self.theta, m.parameters()):
                    p.copy_(th)


class SlowMoReference(OuterReference):
    """theta0 and SlowMo's slow momentum u (zero at the start); ``inner_lr()`` is gamma_t."""

    def __init__(self, models, slowmo_lr, slowmo_momentum, inner_lr):
        self.theta = [p.detach().clone() for p in models[0].parameters()]
        self.u = [torch.zeros_like(t) for t in self.theta]
        self.alpha, self.beta, self.inner_lr = slowmo_lr, slowmo_momentum, inner_lr

    @torch.no_grad()
    def outer_round(self, models):
        gamma = self.inner_lr()
        for th, u, p in zip(self.theta, self.u, models[0].parameters()):
            u.copy_(self.beta * u + (th - p) / gamma)
            th.copy_(th - self.alpha * gamma * u)
        for m in models:
            for th, p in zip(self.theta, m.parameters()):
                p.copy_(th)


def outer_reference(models, opts, spec):
    """The scenario's outer rule: DiLoCo-style SGD (``spec["outer"]`` its keyword arguments),
    or with ``outer_kind`` "slowmo" SlowMo over rank 0's inner learning rate (every rank holds
    the same rate: the scenarios step their schedulers alike)."""
    if spec.get("outer_kind") == "slowmo":
        kw = spec["outer"]
        return SlowMoReference(models, kw.get("slowmo_lr", 1.0), kw.get("slowmo_momentum", 0.5),
                               lambda: opts[0].param_groups[0]["lr"])
    return OuterReference(models, spec["outer"])
