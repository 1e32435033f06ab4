"""SlowMo's outer update (Wang et al., ICLR 2020, Algorithm 1) as a torch optimizer.

SlowMo, per outer iteration t, with gamma_t the inner (base optimizer's) learning rate:

    u     <- beta * u + (x0 - xbar) / gamma_t       the slow momentum, u = 0 at the start
    x0    <- x0 - alpha * gamma_t * u

``x0 - xbar`` is the pseudo-gradient that prsgd_hvd sets as ``.grad`` of the outer tensors, so
this is an ordinary ``torch.optim.Optimizer`` over theta0: ``u`` in ``state[p]["slow_momentum"]``,
alpha and beta in the param groups (``lr``, ``momentum``), and gamma read from the inner
optimizer at every ``step()``. With gamma constant it is ``torch.optim.SGD(lr=alpha,
momentum=beta)`` (its buffer is gamma * u); when gamma changes the two differ, and this is the
one that is SlowMo.

Which gamma: the inner learning rate when the outer step runs. With Algorithms 2 and 3 (an
epoch's rounds come after its last update) that is the epoch's gamma^s, the rate of all the
inner steps the pseudo-gradient sums -- SlowMo's gamma_t. With Algorithm 1 the round comes before
the update of step t, so it is the rate of that update (a scheduler stepped after step t-1 has
already moved it).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, List

import torch


class SlowMo(torch.optim.Optimizer):
    """``SlowMo(params, inner_lr, lr=alpha, momentum=beta)``: ``inner_lr()`` returns gamma_t
    for each parameter's group (a list, one per group) or one float for all."""

    def __init__(self, params: Iterable[torch.Tensor], inner_lr: Callable[[], Any],
                 lr: float = 1.0, momentum: float = 0.5):
        if not callable(inner_lr):
            raise TypeError(f"SlowMo: 'inner_lr' must be a callable returning the inner "
                            f"learning rate, got {type(inner_lr).__name__}")
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"SlowMo: the slow learning rate (lr) must be a finite number > 0, "
                             f"got {lr!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"SlowMo: the slow momentum must be in [0, 1), got {momentum!r}")
        super().__init__(params, dict(lr=float(lr), momentum=float(momentum)))
        # Not a param-group entry: a function is no hyperparameter to save or compare.
        self.inner_lr = inner_lr

    def _gammas(self) -> List[float]:
        got = self.inner_lr()
        gammas = list(got) if isinstance(got, (list, tuple)) else [got] * len(self.param_groups)
        if len(gammas) != len(self.param_groups):
            raise ValueError(f"SlowMo: inner_lr() returned {len(gammas)} learning rates for "
                             f"{len(self.param_groups)} param groups")
        out = []
        for g in gammas:
            g = float(g)
            if not (g > 0 and math.isfinite(g)):
                raise ValueError(f"SlowMo: the inner learning rate must be a finite number > 0 "
                                 f"(SlowMo divides by it), got {g}")
            out.append(g)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, gamma in zip(self.param_groups, self._gammas()):
            alpha, beta = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                u = state.get("slow_momentum")
                if u is None:  # u_0 = 0
                    u = state["slow_momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                u.mul_(beta).add_(p.grad, alpha=1.0 / gamma)
                p.add_(u, alpha=-alpha * gamma)
                state["inner_lr"] = gamma  # the gamma_t of the last step (for inspection)
        return loss


def inner_lr_of(inner: torch.optim.Optimizer) -> Callable[[], float]:
    """gamma, read from the inner optimizer's param groups each time it is called."""
    def read() -> float:
        lrs = {float(g["lr"]) for g in inner.param_groups}
        if len(lrs) != 1:
            raise ValueError(
                f"prsgd_hvd.outer.slowmo: the inner optimizer's param groups have different "
                f"learning rates {sorted(lrs)}; SlowMo divides by one inner rate. Pass "
                f"slowmo(lambda: <the rate>, ...) to say which")
        return lrs.pop()
    return read
