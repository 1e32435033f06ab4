"""Quickstart: hvd.DistributedOptimizer vs prsgd_hvd.DistributedLocalSGD on the same job.

    horovodrun -np 2 -H localhost:2 --gloo python examples/quickstart.py

Trains a small MLP classifier on data generated in process (each rank its own shard), once with
Horovod's synchronous optimizer and once with local SGD at a few intervals, then prints the
final loss of the (averaged) model, the number of allreduce rounds and the wall time of each.

The four lines a Horovod user changes are marked  # <-- local SGD.
"""
import argparse
import time

import torch
from torch import nn

import prsgd_hvd as hvd  # <-- local SGD: everything horovod.torch has, plus DistributedLocalSGD


def make_data(n, seed, dim=32, classes=10):
    """A fixed random teacher network labels Gaussian inputs: learnable, non-trivial, offline."""
    g = torch.Generator().manual_seed(1000)           # same teacher on every rank
    teacher = [torch.randn(dim, 64, generator=g), torch.randn(64, classes, generator=g)]
    g.manual_seed(seed)                                 # each rank its own samples
    x = torch.randn(n, dim, generator=g)
    y = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(1)
    return x, y


def make_model(dim=32, classes=10, width=256):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes))


def train(interval, steps, batch, lr, stream=None):
    """interval=None: hvd.DistributedOptimizer (allreduce every step); else local SGD, with
    streaming rounds when ``stream`` = (fragments, delay)."""
    x, y = make_data(steps * batch, seed=hvd.rank())
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if interval is None:
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    else:
        fragments, delay = stream or (1, 0)
        opt = hvd.DistributedLocalSGD(opt, interval=interval,                 # <-- local SGD
                                      named_parameters=model.named_parameters(),
                                      fragments=fragments, delay=delay)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for i in range(steps):
        xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
    if interval is not None:
        opt.finalize()                                  # <-- local SGD: one common final model
    seconds = time.perf_counter() - start
    rounds = steps if interval is None else opt.rounds
    xt, yt = make_data(4096, seed=10_000)               # the same held-out set on every rank
    with torch.no_grad():
        test_loss = loss_fn(model(xt), yt).item()
    return test_loss, rounds, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--intervals", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--stream", type=int, nargs=3, metavar=("I", "F", "DELAY"), default=[16, 4, 8],
                    help="also run streaming rounds: interval I, F fragments, each merged DELAY "
                         "steps after it starts (I=0: no streaming row)")
    args = ap.parse_args()

    hvd.init()
    torch.set_num_threads(1)
    rows = []
    runs = [(None, None)] + [(i, None) for i in args.intervals]
    if args.stream[0]:
        runs.append((args.stream[0], tuple(args.stream[1:])))
    for interval, stream in runs:
        name = "hvd.DistributedOptimizer" if interval is None else f"DistributedLocalSGD(I={interval})"
        if stream:
            name = f"DistributedLocalSGD(I={interval},F={stream[0]},delay={stream[1]})"
        if hvd.rank() == 0:
            print(f"training with {name} ...", flush=True)
        rows.append((name, *train(interval, args.steps, args.batch, args.lr, stream)))
    if hvd.rank() == 0:
        base_rounds, base_time = rows[0][2], rows[0][3]
        print(f"\n{hvd.size()} ranks, {args.steps} steps of batch {args.batch} per rank, "
              f"SGD lr={args.lr} momentum=0.9")
        print(f"{'optimizer':<38} {'test loss':>9} {'allreduce rounds':>17} {'wall s':>7} {'speed-up':>8}")
        for name, loss, rounds, seconds in rows:
            print(f"{name:<38} {loss:>9.4f} {rounds:>8d} ({rounds / base_rounds:>5.0%}) "
                  f"{seconds:>7.2f} {base_time / seconds:>7.2f}x")


if __name__ == "__main__":
    main()
