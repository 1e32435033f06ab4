"""Float64 reference of an outer optimizer (DiLoCo) around Parallel Restarted SGD.

Plain torch only, none of prsgd_hvd's code, straight from README "Outer optimizers": theta0 is
the model after the last round over the whole set (initially x^0); such a round averages the
ranks' models into ybar, gives the outer optimizer (over copies of theta0) the gradient
theta0 - ybar, steps it, and every rank's model becomes theta0. Warm-up rounds are plain
averages that theta0 follows. tests/reference.py calls :func:`outer_round` through its hook.
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
