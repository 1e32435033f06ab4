"""Heterogeneous.by_speed / every_seconds with rank 1 slowed down on purpose.

Every step sleeps BASE seconds, rank 1 SLOW seconds more, so step times are at least known. Saves
per rank: local steps in each epoch, how long each round waited for the other ranks, the step
time, and for every step the time.perf_counter() just before and just after its opt.step() call
(CLOCK_MONOTONIC: comparable between the ranks of one host), so that the tests can hold the
schedule to what the clocks measured rather than to what an unloaded machine would measure.
"""
import argparse
import time

import torch

import prsgd_hvd as hvd
from common import loss_fn, make_model

BASE, SLOW = 0.01, 0.04


def run(schedule, epochs, rank):
    model = make_model(0)
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.01), interval=schedule)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    step_seconds = BASE + (SLOW if rank == 1 else 0.0)
    steps_per_epoch, waits, steps, t = [], [], 0, 0
    before, after = [], []
    while opt.rounds < epochs:
        t += 1
        rounds, waited = opt.rounds, opt.stats()["exposed_comm_seconds"]
        opt.zero_grad()
        loss_fn(model, 0, rank, t).backward()
        time.sleep(step_seconds)
        before.append(time.perf_counter())
        opt.step()
        after.append(time.perf_counter())
        steps += 1
        if opt.rounds > rounds:
            steps_per_epoch.append(steps)
            waits.append(opt.stats()["exposed_comm_seconds"] - waited)
            steps = 0
    opt.finalize()
    return {"steps_per_epoch": steps_per_epoch, "waits": waits, "step_seconds": step_seconds,
            "before": before, "after": after,
            "intervals": list(opt._local_sgd.schedule.intervals)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    out = {
        "by_speed": run(hvd.Heterogeneous.by_speed(base_interval=2, calibrate_steps=6), 7, hvd.rank()),
        "every_seconds": run(hvd.Heterogeneous.every_seconds(0.25), 5, hvd.rank()),
    }
    torch.save(out, f"{args.out}/rank{hvd.rank()}.pt")


if __name__ == "__main__":
    main()
