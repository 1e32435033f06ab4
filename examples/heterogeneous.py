"""Algorithm 3 of the paper: PR-SGD when one worker is slower than the others.

    horovodrun -np 2 -H localhost:2 --gloo python examples/heterogeneous.py --slow-rank 1 --slow-ms 10

Rank ``--slow-rank`` sleeps ``--slow-ms`` in every step (a worker on older hardware, or sharing
its machine). Each schedule then trains for the same wall time (``--seconds``) and the final
averaged models are compared:

* ``hvd.FixedInterval(I)`` (Algorithm 1): every rank takes I steps per round, so the fast
  ranks wait for the slow one at every average;
* ``hvd.Heterogeneous.by_speed(I)`` (Algorithm 3): after timing a few steps the ranks agree on
  I_i = I * t_slowest / t_i, so a fast rank runs more local steps per round instead of waiting;
* ``hvd.Heterogeneous.every_seconds(s)``: every rank steps until s seconds have passed since
  the last average (default s: the time the slow rank needs for I steps).

``--skew`` gives each rank a different part of the label space (non-IID shards); there, the
plain mean of models that took different numbers of steps leans towards the fast ranks' data,
so Algorithm 3's extra steps can cost accuracy on the global objective. ``--weights steps``
weights each model by the steps it took (``Heterogeneous(..., weights="steps")``); compare both
(docs/REPRODUCTION.md, part 4, measured it leaning further towards the fast ranks).
"""
import argparse
import time

import torch
from torch import nn

import prsgd_hvd as hvd


def make_data(n, seed, dim=32, classes=10):
    """A fixed random teacher labels Gaussian inputs: learnable, non-trivial, offline."""
    g = torch.Generator().manual_seed(1000)
    teacher = [torch.randn(dim, 64, generator=g), torch.randn(64, classes, generator=g)]
    g.manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return x, (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(1)


def make_model(dim=32, classes=10, width=128):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, classes))


def shard(skew):
    """This rank's training pool: IID, or (skew) the samples whose label falls in its share."""
    x, y = make_data(20000, seed=1)
    if skew:
        order = torch.argsort(y, stable=True)   # rank r gets the r-th slice of the sorted labels
    else:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(2))
    mine = order.chunk(hvd.size())[hvd.rank()]
    return x[mine], y[mine]


def train(schedule, args):
    x, y = shard(args.skew)
    gen = torch.Generator().manual_seed(hvd.rank())
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    opt = hvd.DistributedLocalSGD(opt, interval=schedule, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    loss_fn = nn.CrossEntropyLoss()
    slow = hvd.rank() == args.slow_rank
    hvd.allreduce(torch.zeros(1), name="start")        # start the clocks together
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:  # equal wall time for every schedule
        idx = torch.randint(0, len(y), (args.batch,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        if slow:
            time.sleep(args.slow_ms / 1000)            # this worker is slower
        opt.step()
    opt.finalize()                                     # ranks stopped after different step counts
    steps = hvd.allgather_object(opt.local_step)
    xt, yt = make_data(4096, seed=10_000)
    with torch.no_grad():
        test_loss = loss_fn(model(xt), yt).item()
    return test_loss, steps, opt.rounds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slow-rank", type=int, default=1)
    ap.add_argument("--slow-ms", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=5.0, help="wall time of each run")
    ap.add_argument("--interval", type=int, default=8, help="I (the slow rank's I_i)")
    ap.add_argument("--every-seconds", type=float, default=None)
    ap.add_argument("--weights", choices=["uniform", "steps"], default="uniform")
    ap.add_argument("--skew", action="store_true", help="label-skewed shards instead of IID")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.1)
    args = ap.parse_args()

    hvd.init()
    torch.set_num_threads(1)
    every = args.every_seconds or args.interval * args.slow_ms / 1000
    runs = [
        (f"FixedInterval({args.interval})", hvd.FixedInterval(args.interval)),
        (f"Heterogeneous.by_speed({args.interval})",
         hvd.Heterogeneous.by_speed(args.interval, calibrate_steps=10, weights=args.weights)),
        (f"Heterogeneous.every_seconds({every:.3g})",
         hvd.Heterogeneous.every_seconds(every, weights=args.weights)),
    ]
    rows = []
    for name, schedule in runs:
        if hvd.rank() == 0:
            print(f"training with {name} for {args.seconds} s ...", flush=True)
        rows.append((name, *train(schedule, args)))
    if hvd.rank() == 0:
        print(f"\n{hvd.size()} ranks, rank {args.slow_rank} slowed by {args.slow_ms} ms per step, "
              f"{args.seconds} s each, {'label-skewed' if args.skew else 'IID'} shards, "
              f"weights={args.weights!r}")
        print(f"{'schedule':<36} {'test loss':>9} {'rounds':>6}  steps per rank")
        for name, loss, steps, rounds in rows:
            print(f"{name:<36} {loss:>9.4f} {rounds:>6d}  {steps}")
        print("(rounds include the final finalize() average)")


if __name__ == "__main__":
    main()
