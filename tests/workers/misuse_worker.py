"""Misuse and faults a user meets, each a scenario under real horovodrun ranks.

--case agreement   (2 ranks) the ranks disagree: a round, a schedule option, the initial
                   parameters, buffers, param groups; each must raise on every rank
--case local       (2 ranks) errors that belong to one rank's own misuse, and fixes that must
                   just work (LBFGS closures, channels_last, an interrupted wait)
--case uneven      (2 ranks) ranks that end at different steps under schedules that agree on
                   measurements (Adaptive, by_speed); nonfinite='exclude' with momentum
--case hierarchical (4 ranks) Hierarchical with ranks ending at different steps

Every scenario records, per rank, what happened (an error message, or the final parameters),
and the test asserts on all ranks. A scenario that hangs fails the test by its time limit.
"""
from __future__ import annotations

import argparse
import copy
import io
import traceback

import torch
from torch import nn

import prsgd_hvd as hvd
from common import flat_params, loss_fn, make_model


def attempt(fn):
    """Run ``fn``; the error it raised, as 'Type: message', or None."""
    try:
        fn()
        return None
    except Exception as exc:  # noqa: BLE001 - the test inspects the message
        return f"{type(exc).__name__}: {exc}"


def sgd(model, **kw):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train(opt, model, rank, steps, start=1):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_fn(model, 0, rank, t).backward()
        opt.step()


def fresh(interval=2, **kw):
    model = make_model(0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedLocalSGD(sgd(model), interval=interval,
                                  named_parameters=model.named_parameters(), **kw)
    return model, opt


# ---- agreement: every rank must raise ------------------------------------------------------
def average_now_on_one_rank(rank):
    model, opt = fresh(interval=2)

    def run():
        train(opt, model, rank, 1)
        if rank == 0:
            opt.average_now()
        train(opt, model, rank, 5, start=2)
    return attempt(run)


def resume_without_broadcasting_the_counters(rank):
    model, opt = fresh(interval=2)
    train(opt, model, rank, 4)
    saved = opt.state_dict()
    model2, opt2 = fresh(interval=2)
    if rank == 0:  # rank 0 restores the checkpoint; the others do not hear of it
        opt2.load_state_dict(saved)
    return attempt(lambda: train(opt2, model2, rank, 4, start=5))


def parameters_in_a_different_order(rank):
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    for m in (a, b):
        hvd.broadcast_parameters(m.state_dict(), root_rank=0)
    params = [a.weight, b.weight] if rank == 0 else [b.weight, a.weight]
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(params, lr=0.1), interval=1)

    def run():
        (a(torch.ones(2, 4)).sum() + b(torch.ones(2, 4)).sum()).backward()
        opt.step()
    return attempt(run)


def optimizers_built_in_a_different_order(rank):
    torch.manual_seed(1)
    gen, disc = nn.Linear(3, 5), nn.Linear(5, 2)
    for m in (gen, disc):
        hvd.broadcast_parameters(m.state_dict(), root_rank=0)
    order = [gen, disc] if rank == 0 else [disc, gen]

    def build():
        for m in order:
            hvd.DistributedLocalSGD(torch.optim.SGD(m.parameters(), lr=0.1), interval=2)
    return attempt(build)


def same_shaped_optimizers_built_in_another_order(rank):
    torch.manual_seed(2)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    for m in (a, b):
        hvd.broadcast_parameters(m.state_dict(), root_rank=0)
    order = [a, b] if rank == 0 else [b, a]
    opts = {id(m): hvd.DistributedLocalSGD(torch.optim.SGD(m.parameters(), lr=0.1), interval=2)
            for m in order}

    def run():
        for t in range(4):
            for m in (a, b):
                m(torch.full((2, 4), float(rank + t))).sum().backward()
                opts[id(m)].step()
        for m in (a, b):
            opts[id(m)].finalize()
    error = attempt(run)
    return {"error": error} if error else {"a": a.weight.detach().clone(), "b": b.weight.detach().clone()}


def different_nonfinite_modes(rank):
    model = make_model(0)
    return attempt(lambda: hvd.DistributedLocalSGD(
        sgd(model), interval=2, nonfinite="raise" if rank == 0 else "exclude"))


def different_time_varying_callables(rank):
    model = make_model(0)
    lengths = (lambda s: 2) if rank == 0 else (lambda s: 3)
    return attempt(lambda: hvd.DistributedLocalSGD(sgd(model), interval=hvd.TimeVarying(lengths)))


def different_model_buffers(rank):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3 if rank == 0 else 3))
    if rank == 1:
        model[1].register_buffer("extra", torch.zeros(2))
    return attempt(lambda: hvd.DistributedLocalSGD(
        torch.optim.SGD(model.parameters(), lr=0.1), interval=2, model=model))


def add_param_group_on_one_rank(rank):
    model, opt = fresh(interval=2, overlap=False)
    extra = nn.Parameter(torch.zeros(7))

    def run():
        train(opt, model, rank, 2)
        if rank == 1:
            opt.add_param_group({"params": [extra]})
        train(opt, model, rank, 2, start=3)
    return attempt(run)


# ---- one rank's own misuse, and things that must simply work ---------------------------------
def step_after_finalize(rank):
    model, opt = fresh(interval=2)
    train(opt, model, rank, 3)
    opt.finalize()
    return attempt(lambda: train(opt, model, rank, 1, start=4))


def corrupted_checkpoints(rank):
    """Each bad checkpoint differs from the current state everywhere a half-applied load would
    show: other counters and schedule position, doubled momentum, another lr. The optimizer's
    whole state_dict (local-SGD entry included) is compared before and after the refusal."""
    model, opt = fresh(interval=2, overlap=False)
    train(opt, model, rank, 3)
    good = opt.state_dict()
    other = {**good["local_sgd"], "local_step": 7, "rounds": 3}
    out = {"good counters": (good["local_sgd"]["local_step"], good["local_sgd"]["rounds"])}
    for name, local in {"missing": {"rounds": 3}, "negative": {**other, "local_step": -5},
                        "fraction": {**other, "local_step": 5.9},
                        "foreign": "not a dict",
                        "schedule": {**other, "schedule": {"epoch": -2}}}.items():
        before = copy.deepcopy(opt.state_dict())
        bad = {**copy.deepcopy(good), "local_sgd": local}
        bad["param_groups"][0]["lr"] = 123.0  # must not be applied either
        for st in bad["state"].values():
            st["momentum_buffer"].mul_(2)
        out[name] = attempt(lambda: opt.load_state_dict(bad))
        out[name + " unchanged"] = _same_state(before, opt.state_dict())
    # The comparison itself can fail: a good load of the same altered checkpoint changes it.
    bad = {**copy.deepcopy(good), "local_sgd": {**other}}
    for st in bad["state"].values():
        st["momentum_buffer"].mul_(2)
    before = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(bad)
    out["a good load changes the state"] = not _same_state(before, opt.state_dict())
    out["counters after the good load"] = (opt.local_step, opt.rounds)
    return out


def _same_state(a, b):
    """Two optimizer state_dicts equal in every entry: counters, schedule, param groups, and
    every tensor of the inner optimizer's state."""
    if a.keys() != b.keys() or a["local_sgd"] != b["local_sgd"] or a["param_groups"] != b["param_groups"]:
        return False
    if a["state"].keys() != b["state"].keys():
        return False
    for k in a["state"]:
        sa, sb = a["state"][k], b["state"][k]
        if sa.keys() != sb.keys():
            return False
        for key in sa:
            va, vb = sa[key], sb[key]
            if not (torch.equal(va, vb) if torch.is_tensor(va) else va == vb):
                return False
    return True


def copies_and_pickles(rank):
    model, opt = fresh(interval=2)
    return {"deepcopy": attempt(lambda: copy.deepcopy(opt)),
            "torch.save": attempt(lambda: torch.save(opt, io.BytesIO())),
            "state_dict saves": attempt(lambda: torch.save(opt.state_dict(), io.BytesIO()))}


def bad_parameters(rank):
    w = nn.Parameter(torch.ones(3))
    meta = nn.Parameter(torch.empty(3, device="meta"))
    return {"duplicate": attempt(lambda: hvd.DistributedLocalSGD(
                torch.optim.SGD([{"params": [w, w]}], lr=0.1), interval=2)),
            "meta": attempt(lambda: hvd.DistributedLocalSGD(
                torch.optim.SGD([meta], lr=0.1), interval=2))}


def lbfgs_with_closure(rank):
    model = make_model(0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedLocalSGD(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3),
                                  interval=2)
    losses = []
    for t in range(1, 5):
        def closure():
            opt.zero_grad()
            loss = loss_fn(model, 0, rank, t)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure)))
        if t == 2:  # right after the first round: the average, then an LBFGS step from it
            after_round = flat_params(model)
    opt.finalize()
    return {"losses": losses, "after_round": after_round, "params": flat_params(model),
            "rounds": opt.rounds}


def channels_last(rank):
    out = {}
    for fused in (None, False):
        torch.manual_seed(3)
        conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
        hvd.broadcast_parameters(conv.state_dict(), root_rank=0)  # Horovod needs dense tensors
        conv.to(memory_format=torch.channels_last)
        opt = hvd.DistributedLocalSGD(torch.optim.SGD(conv.parameters(), lr=0.05, momentum=0.9),
                                      interval=2, fused=fused)
        g = torch.Generator().manual_seed(rank)
        for _ in range(4):
            opt.zero_grad()
            conv(torch.randn(2, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)).square().mean().backward()
            opt.step()
        opt.finalize()
        out[str(fused)] = torch.cat([p.detach().reshape(-1) for p in conv.parameters()])
        out["still channels_last"] = conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    return out


class _InterruptOnce:
    """Raise KeyboardInterrupt on the first wait for a round, as a Ctrl-C would arrive (the
    real Horovod wait runs afterwards, when the step is retried)."""

    def __init__(self):
        self.real, self.armed = hvd.synchronize, False

    def __call__(self, handle):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return self.real(handle)


def interrupted_wait(rank):
    import horovod.torch as horovod_torch

    out = {}
    for interrupt in (False, True):
        model, opt = fresh(interval=2)
        hook = _InterruptOnce()
        horovod_torch.synchronize = hook
        try:
            for t in range(1, 7):
                opt.zero_grad()
                loss_fn(model, 0, rank, t).backward()
                hook.armed = interrupt and t == 4 and rank == 1
                try:
                    opt.step()
                except KeyboardInterrupt:
                    out["interrupted at"] = t
                    opt.step()  # the user retries the step: the round resumes
        finally:
            horovod_torch.synchronize = hook.real
        opt.finalize()
        out[f"params interrupt={interrupt}"] = flat_params(model)
        out[f"rounds interrupt={interrupt}"] = opt.rounds
    return out


# ---- uneven endings ----------------------------------------------------------------------------
def uneven(rank, schedule, steps):
    """Train steps[rank] steps and finalize(); ``rounds_log``: the round counter after each step
    (the reference replays the rounds the measurements led to)."""
    model = make_model(0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedLocalSGD(sgd(model), interval=schedule)
    rounds_log = []
    for t in range(1, steps[rank] + 1):
        train(opt, model, rank, 1, start=t)
        rounds_log.append(opt.rounds)
    opt.finalize()
    return {"params": flat_params(model), "rounds": opt.rounds, "rounds_log": rounds_log,
            "schedule": repr(opt._local_sgd.schedule)}


def exclude_with_momentum(rank):
    model, opt = fresh(interval=2, nonfinite="exclude", overlap=False)
    finite = []
    for t in range(1, 9):
        opt.zero_grad()
        loss_fn(model, 0, rank, t).backward()
        if rank == 1 and t == NAN_AT:
            model.fc1.weight.grad.fill_(float("nan"))
        opt.step()
        finite.append(bool(torch.isfinite(flat_params(model)).all()))
    opt.finalize()
    return {"excluded": opt.stats()["excluded"], "finite": finite, "params": flat_params(model)}


# Steps per rank of the uneven-ending scenarios (the test's reference needs them too).
UNEVEN_STEPS = {"adaptive": [9, 17], "by_speed": [3, 16], "hierarchical": [6, 9, 13, 3]}
# exclude_with_momentum: rank 1's gradient turns NaN at this step (round 2 leaves it out).
NAN_AT = 3

CASES = {
    "agreement": [average_now_on_one_rank, resume_without_broadcasting_the_counters,
                  parameters_in_a_different_order, optimizers_built_in_a_different_order,
                  same_shaped_optimizers_built_in_another_order, different_nonfinite_modes,
                  different_time_varying_callables, different_model_buffers,
                  add_param_group_on_one_rank],
    "local": [step_after_finalize, corrupted_checkpoints, copies_and_pickles, bad_parameters,
              lbfgs_with_closure, channels_last, interrupted_wait],
    "uneven": [
        lambda rank: uneven(rank, hvd.Adaptive(initial=2, max_interval=4), UNEVEN_STEPS["adaptive"]),
        lambda rank: uneven(rank, hvd.Heterogeneous.by_speed(2, calibrate_steps=6),
                            UNEVEN_STEPS["by_speed"]),
        exclude_with_momentum],
    "hierarchical": [lambda rank: uneven(rank, hvd.Hierarchical({2: 2, 4: 4}),
                                         UNEVEN_STEPS["hierarchical"])],
}
NAMES = {"uneven": ["adaptive", "by_speed", "exclude_with_momentum"], "hierarchical": ["hierarchical"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--case", required=True, choices=sorted(CASES))
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    rank = hvd.rank()
    results = {}
    names = NAMES.get(args.case) or [fn.__name__ for fn in CASES[args.case]]
    for name, scenario in zip(names, CASES[args.case]):
        try:
            results[name] = scenario(rank)
        except Exception:  # noqa: BLE001 - recorded; the test names the scenario
            results[name] = {"crashed": traceback.format_exc()}
        hvd.allreduce(torch.zeros(1), name=f"misuse.sync.{name}")  # line the ranks up again
    torch.save(results, f"{args.out}/rank{rank}.pt")


if __name__ == "__main__":
    main()
