"""Float64, single-process simulation of all ranks of Parallel Restarted SGD.

Written with plain torch optimizers only -- none of prsgd_hvd's code -- straight from the
algorithm statements in DESIGN.md §3, so that the package is held to an independent reference.
"""
from __future__ import annotations

import copy

import torch

from workers.common import flat_params, loss_fn, make_model, make_optimizer


def _average_models_(models):
    with torch.no_grad():
        for ps in zip(*(m.parameters() for m in models)):
            mean = torch.stack([p for p in ps]).mean(0)
            for p in ps:
                p.copy_(mean)


def simulate_fixed_interval(spec: dict, n: int) -> torch.Tensor:
    """Algorithm 1 (+ warm-up, LR scheduler, Horovod's optimizer-state init) on ``n`` ranks.

    Returns a tensor [n, steps, n_params] of every rank's parameters after every step.
    """
    base = make_model(spec["seed"]).double()
    models = [copy.deepcopy(base) for _ in range(n)]
    opts = [make_optimizer(spec, m) for m in models]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=spec["lr_step"][0], gamma=spec["lr_step"][1])
              if spec.get("lr_step") else None for o in opts]
    if spec.get("broadcast_state"):
        # hvd.broadcast_optimizer_state initialises empty state with one step on zero grads.
        for m, o in zip(models, opts):
            for p in m.parameters():
                p.grad = torch.zeros_like(p)
            o.step()
    interval, warmup = spec["interval"], spec.get("warmup", 0)
    traj = [[] for _ in range(n)]
    for t in range(1, spec["steps"] + 1):
        for r, (m, o) in enumerate(zip(models, opts)):
            o.zero_grad()
            loss_fn(m, spec["seed"], r, t, dtype=torch.float64).backward()
        if t <= warmup or t % interval == 0:
            _average_models_(models)   # x_i <- avg(x^{t-1}); the local gradient is kept
        for r, (m, o) in enumerate(zip(models, opts)):
            o.step()
            if scheds[r] is not None:
                scheds[r].step()
            traj[r].append(flat_params(m))
    return torch.stack([torch.stack(tr) for tr in traj])
