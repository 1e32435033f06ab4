"""Float64, single-process simulation of all ranks of Parallel Restarted SGD.

Written with plain torch optimizers only -- none of prsgd_hvd's code -- straight from the
algorithm statements in README.md ("What exactly happens"), so that the package is held to an independent reference.
"""
from __future__ import annotations

import copy

import torch

from workers.common import (epoch_length, epoch_lr, flat_params, loss_fn, make_model,
                            make_optimizer, steps_for_rank)


def _average_groups_(models, groups):
    for g in groups:
        _average_models_([models[r] for r in g])


def _average_models_(models, weights=None):
    weights = torch.ones(len(models), dtype=torch.float64) if weights is None else \
        torch.tensor(weights, dtype=torch.float64)
    with torch.no_grad():
        for ps in zip(*(m.parameters() for m in models)):
            stacked = torch.stack([p for p in ps])
            mean = (stacked * weights.view(-1, *[1] * (stacked.dim() - 1))).sum(0) / weights.sum()
            for p in ps:
                p.copy_(mean)


def _start(spec, n):
    base = make_model(spec["seed"]).double()
    models = [copy.deepcopy(base) for _ in range(n)]
    return models, [make_optimizer(spec, m) for m in models]


def _local_step(spec, r, t, model, opt):
    opt.zero_grad()
    k = spec.get("backward_passes", 1)  # gradient accumulation over k micro-batches
    for j in range(k):
        micro = t if k == 1 else k * t + j
        (loss_fn(model, spec["seed"], r, micro, dtype=torch.float64) / k).backward()


def fixed_interval_groups(spec: dict, n: int):
    """Which groups of ranks average before step t's update (None: no round)."""
    sched = spec.get("schedule", {})
    if "process_set_groups" in spec:
        everyone = spec["process_set_groups"]
    else:
        everyone = [list(range(n))]
    if sched.get("kind") == "hierarchical":
        def groups_at(t):
            for period, size in sorted(sched["levels"], reverse=True):
                if t % period == 0:
                    return [list(range(s, s + size)) for s in range(0, n, size)]
            return None
        return groups_at
    interval, warmup = spec["interval"], spec.get("warmup", 0)
    return lambda t: everyone if t <= warmup or t % interval == 0 else None


def simulate_fixed_interval(spec: dict, n: int) -> torch.Tensor:
    """Algorithm 1 (+ warm-up, LR scheduler, Horovod's optimizer-state init) on ``n`` ranks;
    also Hierarchical rounds and averaging within process sets (``fixed_interval_groups``).

    Rank r runs ``steps_for_rank`` steps (uneven data); a rank that has run out keeps taking
    part in the rounds of the others with its model unchanged, and with ``finalize`` every
    rank ends with one last plain average. Returns (per-rank [steps_r, n_params] trajectories,
    final parameters per rank, per-rank {step: ||x_r - avg||^2 at that step's round}).
    """
    models, opts = _start(spec, n)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=spec["lr_step"][0], gamma=spec["lr_step"][1])
              if spec.get("lr_step") else None for o in opts]
    if spec.get("broadcast_state"):
        # hvd.broadcast_optimizer_state initialises empty state with one step on zero grads;
        # for a wrapped optimizer the parameters are then put back (prsgd_hvd.horovod_compat).
        for m, o in zip(models, opts):
            kept = [p.detach().clone() for p in m.parameters()]
            for p in m.parameters():
                p.grad = torch.zeros_like(p)
            o.step()
            with torch.no_grad():
                for p, k in zip(m.parameters(), kept):
                    p.copy_(k)
    groups_at = fixed_interval_groups(spec, n)
    steps = [steps_for_rank(spec, r, n) for r in range(n)]
    traj = [[] for _ in range(n)]
    divergence = [dict() for _ in range(n)]  # step -> ||x_r - avg||^2 at that step's round
    for t in range(1, max(steps) + 1):
        active = [r for r in range(n) if t <= steps[r]]
        for r in active:
            _local_step(spec, r, t, models[r], opts[r])
        groups = groups_at(t)
        if groups is not None:
            for g in groups:
                mean = torch.stack([flat_params(models[r]) for r in g]).mean(0)
                for r in g:
                    if r in active:
                        divergence[r][t] = float(((flat_params(models[r]) - mean) ** 2).sum())
            _average_groups_(models, groups)  # x_i <- avg(x^{t-1}); the local gradient is kept
        for r in active:
            opts[r].step()
            if scheds[r] is not None:
                scheds[r].step()
            traj[r].append(flat_params(models[r]))
    if spec.get("finalize"):
        _average_groups_(models, spec.get("process_set_groups", [list(range(n))]))
    return [torch.stack(tr) for tr in traj], [flat_params(m) for m in models], divergence


def simulate_epochs(spec: dict, n: int):
    """Algorithms 2 and 3: epoch s has K_r^s local steps on rank r at lr gamma^s, then every
    rank averages (plain mean, or weighted by K_r^s for weights="steps"). Returns the same
    triple as :func:`simulate_fixed_interval`, without divergences (None)."""
    sched = spec["schedule"]
    models, opts = _start(spec, n)
    lr_scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=spec["lr_step"][0], gamma=spec["lr_step"][1])
                 if spec.get("lr_step") else None for o in opts]
    t = [0] * n
    traj = [[] for _ in range(n)]
    for s in range(1, sched["epochs"] + 1):
        lengths = [epoch_length(sched, r, s) for r in range(n)]
        lr = epoch_lr(sched, s)
        for r in range(n):
            if lr is not None:
                for g in opts[r].param_groups:
                    g["lr"] = lr
            for _ in range(lengths[r]):
                t[r] += 1
                _local_step(spec, r, t[r], models[r], opts[r])
                opts[r].step()
                if lr_scheds[r] is not None:
                    lr_scheds[r].step()
                traj[r].append(flat_params(models[r]))
        _average_models_(models, lengths if sched.get("weights") == "steps" else None)
        for r in range(n):  # the average happens inside the epoch's last step() call
            traj[r][-1] = flat_params(models[r])
    if spec.get("finalize"):
        _average_models_(models)
    return [torch.stack(tr) for tr in traj], [flat_params(m) for m in models], None
