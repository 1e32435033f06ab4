"""Float64, single-process simulation of all ranks of Parallel Restarted SGD.

Written with plain torch optimizers only -- none of prsgd_hvd's code -- straight from the
algorithm statements in README.md ("What exactly happens"), so that the package is held to an independent reference.
"""
from __future__ import annotations

import copy

import torch

from reference_outer import outer_reference
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
    outer = outer_reference(models, opts, spec) if spec.get("outer") else None
    steps = spec.get("steps_per_rank") or [steps_for_rank(spec, r, n) for r in range(n)]
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
            if outer is not None:  # theta0 follows warm-up rounds, ignores group rounds
                if t <= spec.get("warmup", 0):
                    outer.follow(models)
                elif groups == [list(range(n))]:
                    outer.outer_round(models)
        for r in active:
            opts[r].step()
            if scheds[r] is not None:
                scheds[r].step()
            traj[r].append(flat_params(models[r]))
    if spec.get("finalize"):
        _average_groups_(models, spec.get("process_set_groups", [list(range(n))]))
        if outer is not None:
            outer.outer_round(models)
    return [torch.stack(tr) for tr in traj], [flat_params(m) for m in models], divergence


def _state_entries(opt, p):
    """Optimizer-state tensors shaped like ``p`` (what average_state=True averages)."""
    st = opt.state.get(p, {})
    return {k for k, v in st.items() if torch.is_tensor(v) and v.is_floating_point()
            and v.shape == p.shape}


def _average_round_(models, opts, contributors, average_state):
    """One round: the mean over ``contributors`` of every parameter, floating buffer and (with
    average_state) state entry that EVERY rank has -- the others stay local -- written to all."""
    with torch.no_grad():
        tensors = [list(ts) for ts in zip(*(m.parameters() for m in models))]
        tensors += [list(bs) for bs in zip(*(m.buffers() for m in models))
                    if bs[0].is_floating_point()]
        if average_state:
            for ps in zip(*(m.parameters() for m in models)):
                common = set.intersection(*(_state_entries(o, p) for o, p in zip(opts, ps)))
                tensors += [[o.state[p][k] for o, p in zip(opts, ps)] for k in sorted(common)]
        for ts in tensors:
            mean = torch.stack([ts[r] for r in contributors]).mean(0)
            for t in ts:
                t.copy_(mean)


def simulate_rounds(models, opts, grad, steps, round_steps, *, when="before", update=None,
                    skips=(), excluded=None, average_state=False, finalize=True):
    """Any schedule, held to the rounds it made: rank r's k-th round happened inside its step
    ``round_steps[r][k]`` (missing: r had finished and joined with its model unchanged), either
    ``"before"`` its update (Algorithm 1: the gradient is taken at the local point, the update is
    applied to the average) or ``"after"`` it (an epoch ends). ``grad(r, t)`` takes rank r's
    gradient of step t; ``update(r, t)`` applies it (default ``opts[r].step()``). ``skips``:
    {(r, t)} whose update a GradScaler skipped (the step still joins its round). ``excluded``:
    {k: ranks} left out of round k (nonfinite="exclude"): they take the others' mean, skip that
    step's update and drop optimizer state that is not finite. Ends with one plain average when
    ``finalize``. Mutates ``models``/``opts``; returns each rank's flat float64 parameters."""
    n = len(models)
    update = update or (lambda r, t: opts[r].step())
    done = [0] * n

    def advance(r, upto):
        while done[r] < upto:
            t = done[r] + 1
            grad(r, t)
            if (r, t) not in skips:
                update(r, t)
            done[r] = t

    for k in range(max(len(rs) for rs in round_steps)):
        at = [rs[k] if k < len(rs) else None for rs in round_steps]
        for r, t in enumerate(at):
            if t is None:
                advance(r, steps[r])
            elif when == "before":
                advance(r, t - 1)
                grad(r, t)
            else:
                advance(r, t)
        out = set((excluded or {}).get(k + 1, ()))
        sick = {r: [p for p, st in opts[r].state.items()
                    if any(torch.is_tensor(v) and not torch.isfinite(v).all() for v in st.values())]
                for r in out}
        _average_round_(models, opts, [r for r in range(n) if r not in out], average_state)
        for r, ps in sick.items():
            for p in ps:
                del opts[r].state[p]
        for r, t in enumerate(at):
            if when == "before" and t is not None:
                if (r, t) not in skips and r not in out:
                    update(r, t)
                done[r] = t
    for r in range(n):
        advance(r, steps[r])
    if finalize:
        _average_round_(models, opts, range(n), average_state)
    return [flat_params(m) for m in models]


def rounds_from_log(rounds_after_step):
    """The steps at which a rank's rounds happened, from its ``rounds`` counter after each step."""
    out, before = [], 0
    for t, rounds in enumerate(rounds_after_step, start=1):
        assert rounds - before in (0, 1), f"{rounds - before} rounds in step {t}"
        if rounds > before:
            out.append(t)
        before = rounds
    return out


def common_start(spec, n):
    """``n`` float64 copies of the workers' common.Net and their optimizers, plus ``grad(r, t)``
    on common.loss_fn's data (``hook(r, t, model)`` may then alter the gradient)."""
    models, opts = _start(spec, n)

    def grad(r, t):
        _local_step(spec, r, t, models[r], opts[r])
        if spec.get("hook"):
            spec["hook"](r, t, models[r])
    return models, opts, grad


def simulate_epochs(spec: dict, n: int):
    """Algorithms 2 and 3: epoch s has K_r^s local steps on rank r at lr gamma^s, then every
    rank averages (plain mean, or weighted by K_r^s for weights="steps"). Returns the same
    triple as :func:`simulate_fixed_interval`, without divergences (None)."""
    sched = spec["schedule"]
    models, opts = _start(spec, n)
    outer = outer_reference(models, opts, spec) if spec.get("outer") else None
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
        if outer is not None:
            outer.outer_round(models)
        for r in range(n):  # the average happens inside the epoch's last step() call
            traj[r][-1] = flat_params(models[r])
    if spec.get("finalize"):
        _average_models_(models)
        if outer is not None:
            outer.outer_round(models)
    return [torch.stack(tr) for tr in traj], [flat_params(m) for m in models], None
