"""Exposed communication per averaging round, overlap on vs off, in the same run.

    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/bench_overlap.py

With overlap (the default) the round of step t is packed and its allreduce started as soon as
step t-1 ends, so it runs while step t's forward and backward compute; step t waits only for
what is left. The model is sized so that a step's compute and a round's allreduce take
comparable time. Variants alternate (on, off, on, off, ...) so machine-load drift hits both.
Prints per round: allreduce time (start to end) and exposed time (what step() waited).
"""
import argparse
import statistics
import time

import torch
from torch import nn

import prsgd_hvd as hvd


def measure(overlap, args):
    torch.manual_seed(0)
    layers = []
    for _ in range(args.depth):
        layers += [nn.Linear(args.width, args.width), nn.Tanh()]
    model = nn.Sequential(*layers)
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9),
                                  interval=args.interval, overlap=overlap)
    x = torch.randn(args.batch, args.width)
    start = time.perf_counter()
    for _ in range(args.steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    seconds = time.perf_counter() - start
    opt.finalize()
    s = opt.stats()
    rounds = s["rounds"] - 1  # the finalize() round is not part of the loop
    return {"comm": s["comm_seconds"] / s["rounds"], "exposed": s["exposed_comm_seconds"] / s["rounds"],
            "step": seconds / args.steps, "rounds": rounds,
            "params": sum(p.numel() for p in model.parameters())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    runs = {True: [], False: []}
    for _ in range(args.repeats):
        for overlap in (True, False):
            runs[overlap].append(measure(overlap, args))
    if hvd.rank() == 0:
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("comm", "exposed", "step")}
               for k, v in runs.items()}
        p = runs[True][0]["params"]
        print(f"{hvd.size()} ranks, MLP {args.depth}x{args.width} ({p:,} params, "
              f"{p * 4 / 2**20:.1f} MiB per round), batch {args.batch}, I={args.interval}, "
              f"{args.steps} steps x {args.repeats} repeats per variant (medians)")
        print(f"{'variant':<12} {'step ms':>8} {'allreduce ms/round':>19} {'exposed ms/round':>17}")
        for overlap in (True, False):
            m = med[overlap]
            print(f"{'overlap on' if overlap else 'overlap off':<12} {m['step'] * 1e3:>8.1f} "
                  f"{m['comm'] * 1e3:>19.1f} {m['exposed'] * 1e3:>17.1f}")
        on, off = med[True], med[False]
        print(f"exposed communication per round, on/off: {on['exposed'] / off['exposed']:.2f}x; "
              f"step time on/off: {on['step'] / off['step']:.2f}x")


if __name__ == "__main__":
    main()
