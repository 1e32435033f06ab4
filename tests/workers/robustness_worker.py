"""Conditions real training meets: AMP overflow on one rank, a non-finite model, a crash.

--case faults: runs the 'amp', 'nonfinite_raise' and 'nonfinite_exclude' scenarios, averaged
optimizer state and averaged BatchNorm buffers, and saves what each rank saw (the test holds
the values to tests/reference.py). --case crash: rank 1 raises mid-run (the job must end, not hang).
"""
import argparse

import torch

import prsgd_hvd as hvd
from torch import nn

from common import batch, flat_params, loss_fn, make_model

# GradScaler overflows injected by amp(): (rank, step). Step 3 is a local step, step 4 an
# averaging one (that rank takes the average and skips only its own update).
AMP_OVERFLOWS = ((1, 3), (2, 4))


def amp(rank):
    """Ranks' gradients overflow at AMP_OVERFLOWS: the update is skipped, the schedule is not."""
    model = make_model(7)
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                  interval=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    seen = []
    for t in range(1, 7):
        opt.zero_grad()
        scaler.scale(loss_fn(model, 7, rank, t)).backward()
        if (rank, t) in AMP_OVERFLOWS:
            model.fc1.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        seen.append({"t": t, "local_step": opt.local_step, "rounds": opt.rounds,
                     "params": flat_params(model), "scale": scaler.get_scale()})
    return seen


def nonfinite(rank, mode):
    """Rank 1's step 1 update makes its model NaN (a NaN gradient); the round at step 2 must
    notice. (Injected through the gradient: with overlap on, the round of step 2 is packed as
    soon as step 1 returns, so the NaN must come from training, as it does in practice.)"""
    model = make_model(8)
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.05), interval=2,
                                  nonfinite=mode)
    out = {"error": None}
    try:
        for t in range(1, 5):
            opt.zero_grad()
            loss_fn(model, 8, rank, t).backward()
            if t == 1 and rank == 1:
                model.fc2.bias.grad.fill_(float("nan"))
            opt.step()
            if t == 1:
                out["after_step1"] = flat_params(model)
            if t == 2:
                out["after_step2"] = flat_params(model)
    except FloatingPointError as exc:
        out["error"] = str(exc)
    out["stats"] = opt.stats()
    out["final"] = flat_params(model)
    return out


def momentum_of(opt, model):
    """Every parameter's momentum buffer by name (None where this rank has none yet)."""
    return {n: opt.state[p]["momentum_buffer"].clone() if "momentum_buffer" in opt.state[p]
            else None for n, p in model.named_parameters()}


def shared_state(rank):
    """average_state=True while one parameter has momentum on rank 0 only (its branch), on the
    fused and the reference path; ends with average_now()."""
    out = {}
    for fused in (None, False):
        model = make_model(10)
        opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                      interval=2, average_state=True, model=model, fused=fused)
        for t in range(1, 6):
            opt.zero_grad()
            loss_fn(model, 10, rank, t).backward()
            opt.step()
            if t == 4:  # right after round 2: the average, then this rank's own update
                out[f"step4 fused={fused}"] = {"params": flat_params(model),
                                               "momentum": momentum_of(opt, model)}
        opt.average_now()
        out[f"end fused={fused}"] = {"params": flat_params(model), "momentum": momentum_of(opt, model),
                                     "rounds": opt.rounds}
    return out


def bn_net():
    """A model with BatchNorm statistics, the buffers model= asks to average."""
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, momentum=0.3), nn.Tanh(),
                         nn.Linear(5, 3))


def bn_loss(model, rank, t):
    x, y = batch(11, rank, t, dtype=next(model.parameters()).dtype)
    x = x * (1 + rank)  # rank-dependent statistics, so the averaged buffers are not trivial
    return ((model(x) - y) ** 2).mean()


def buffers(rank):
    """model=: BatchNorm running statistics averaged at every round (interval 2, 5 steps,
    finalize), with and without overlap."""
    out = {}
    for overlap in (True, False):
        model = bn_net()
        opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                      interval=2, model=model, overlap=overlap)
        for t in range(1, 6):
            opt.zero_grad()
            bn_loss(model, rank, t).backward()
            opt.step()
        opt.finalize()
        out[f"overlap={overlap}"] = {
            "params": flat_params(model), "running_mean": model[1].running_mean.clone(),
            "running_var": model[1].running_var.clone(),
            "num_batches_tracked": int(model[1].num_batches_tracked)}
    return out


def elastic_state(rank):
    """LocalSGDState: sync brings rank 0's model and schedule to every rank; restore goes
    back to the last commit; reset re-binds the optimizer and training goes on."""
    from prsgd_hvd.elastic import LocalSGDState
    # Horovod's broadcast_optimizer_state needs the same state structure on every rank, so no
    # rank-dependent branch here (common.Net has one).
    torch.manual_seed(12)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                  interval=100)

    def train_step(t):
        opt.zero_grad()
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * rank + t))
        model(x).pow(2).mean().backward()
        opt.step()

    for t in range(1, rank + 2):  # rank r takes r + 1 local steps: counters differ
        train_step(t)
    state = LocalSGDState(model, opt, epoch=rank)
    state.sync()
    out = {"synced_step": opt.local_step, "synced_epoch": state.epoch,
           "synced_params": flat_params(model)}
    state.commit()
    for t in range(2):
        train_step(50 + t)
    state.restore()
    out["restored_step"] = opt.local_step
    out["restored_equal"] = torch.equal(flat_params(model), out["synced_params"])
    state.reset()  # what hvd.elastic does after re-initialising Horovod
    opt._local_sgd.schedule.interval = 2  # keep going: rounds must still work
    for t in range(2):
        train_step(60 + t)
    out["rounds_after_reset"] = opt.rounds
    return out


def crash(rank):
    model = make_model(9)
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.05), interval=2)
    for t in range(1, 100):
        opt.zero_grad()
        loss_fn(model, 9, rank, t).backward()
        if rank == 1 and t == 3:
            raise RuntimeError("boom on rank 1 at step 3")
        opt.step()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--case", required=True)
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    rank = hvd.rank()
    if args.case == "crash":
        crash(rank)
        return
    out = {"amp": amp(rank), "raise": nonfinite(rank, "raise"),
           "exclude": nonfinite(rank, "exclude"), "state": shared_state(rank),
           "buffers": buffers(rank),
           "elastic": elastic_state(rank)}
    torch.save(out, f"{args.out}/rank{rank}.pt")
    # Leave together: a round prestarted by the last step (elastic_state) is sent by every rank
    # before this, instead of by a rank that finds Horovod already shut down by another's exit.
    hvd.allreduce(torch.zeros(1), name="robustness_worker.done")


if __name__ == "__main__":
    main()
