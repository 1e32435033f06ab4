"""Adaptive intervals under horovodrun: every rank must follow the same interval sequence."""
import argparse

import torch

import prsgd_hvd as hvd
from common import loss_fn, make_model


def run(schedule, steps, rank, **kw):
    model = make_model(11)
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.05), interval=schedule, **kw)
    averaged_at = []
    for t in range(1, steps + 1):
        before = opt.rounds
        opt.zero_grad()
        loss_fn(model, 11, rank, t).backward()
        opt.step()
        if opt.rounds > before:
            averaged_at.append(t)
    return {"averaged_at": averaged_at, "history": list(schedule.history),
            "resumed": _resume_matches(opt, schedule)}


def _resume_matches(opt, schedule):
    fresh = hvd.Adaptive(initial=schedule.history[0] if schedule.history else 1)
    fresh.load_state_dict(opt.state_dict()["local_sgd"]["schedule"])
    return (fresh.interval, fresh.next_round) == (schedule.interval, schedule.next_round)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    hvd.init()
    r = hvd.rank()
    out = {
        # Any waiting is too much: the interval doubles after every round, up to 8.
        "grow": run(hvd.Adaptive(initial=1, max_interval=8, comm_fraction=1e-9), 24, r, overlap=False),
        # Any divergence is too much: the interval halves after every round, down to 2.
        "shrink": run(hvd.Adaptive(initial=8, min_interval=2, max_divergence=1e-30), 16, r),
    }
    torch.save(out, f"{args.out}/rank{r}.pt")


if __name__ == "__main__":
    main()
