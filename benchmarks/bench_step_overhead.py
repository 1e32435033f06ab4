"""What DistributedLocalSGD adds to a step, on one rank (no communication): the wrapper's own cost.

    python benchmarks/bench_step_overhead.py [--steps 2000] [--repeats 5]

Times ``opt.step()`` alone (gradients are computed once and reused) for a plain
``torch.optim.SGD`` and for the same optimizer wrapped with ``DistributedLocalSGD`` at
interval 1 (a round every step: pack, "average" over one rank, fused write-back) and at
interval 16 (mostly local steps), on a small MLP. Repeats are interleaved; the table shows
medians of CPU time per step and the ratio to the plain step measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import prsgd_hvd as hvd


def make(interval):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if interval is not None:
        opt = hvd.DistributedLocalSGD(opt, interval=interval, overlap=False)
    model(torch.randn(32, 64)).square().mean().backward()
    return opt


def time_steps(opt, steps):
    # CPU time of this thread: the machines here are shared, and wall time under contention
    # measures the neighbours. One intra-op thread, so this is the whole cost of a step.
    t0 = time.thread_time()
    for _ in range(steps):
        opt.step()
    return (time.thread_time() - t0) / steps * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    variants = {"torch SGD": None, "DistributedLocalSGD I=1": 1, "DistributedLocalSGD I=16": 16}
    opts = {name: make(i) for name, i in variants.items()}
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, opt in opts.items():
            times[name].append(time_steps(opt, args.steps))
    base = statistics.median(times["torch SGD"])
    print(f"{'variant':28s} {'CPU us/step (med)':>18s} {'range':>16s} {'x torch SGD':>12s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:28s} {med:18.1f} {min(ts):7.1f}-{max(ts):<8.1f} {med / base:12.2f}")


if __name__ == "__main__":
    main()
