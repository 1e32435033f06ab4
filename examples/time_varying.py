"""Algorithm 2 of the paper: PR-SGD with time-varying epoch lengths and learning rates.

    horovodrun -np 2 -H localhost:2 --gloo python examples/time_varying.py

Epoch s runs K^s local steps with learning rate gamma^s on every rank, then the ranks average
(``hvd.TimeVarying``). Three runs of the same job, each compared by the loss of the final
averaged model and by how many allreduce rounds it needed:

* ``hvd.FixedInterval(I)`` with a constant learning rate (Algorithm 1, for reference);
* ``hvd.TimeVarying.paper(...)``: the slides' K^s = floor(k0 s^(1/3) / N), gamma^s = lr0 N / s^(2/3)
  (with an epoch of at least one step and gamma capped at ``lr_max``);
* ``hvd.TimeVarying([...], lrs=[...], repeat_last=True)``: explicit lists, e.g. epochs that
  double in length while the learning rate steps down.

The first epochs of each run (K^s, gamma^s) are printed as the job observed them.
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


def train(schedule, steps, batch, lr):
    x, y = make_data(steps * batch, seed=hvd.rank())
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt = hvd.DistributedLocalSGD(opt, interval=schedule, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    loss_fn = nn.CrossEntropyLoss()
    epochs, last_round_step = [], 0
    start = time.perf_counter()
    with opt.local_sgd():                              # calls opt.finalize() at the end
        for i in range(steps):
            xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            lr_used = opt.param_groups[0]["lr"]        # set by the schedule at the epoch start
            rounds_before = opt.rounds
            opt.step()
            if opt.rounds > rounds_before:             # this step ended an epoch
                epochs.append((opt.local_step - last_round_step, lr_used))
                last_round_step = opt.local_step
    seconds = time.perf_counter() - start
    xt, yt = make_data(4096, seed=10_000)
    with torch.no_grad():
        test_loss = loss_fn(model(xt), yt).item()
    return test_loss, opt.rounds, seconds, epochs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.2, help="constant lr of the fixed-interval run")
    ap.add_argument("--interval", type=int, default=8)
    ap.add_argument("--k0", type=float, default=16.0, help="TimeVarying.paper epoch-length scale")
    ap.add_argument("--lr0", type=float, default=0.3, help="TimeVarying.paper lr scale")
    args = ap.parse_args()

    hvd.init()
    torch.set_num_threads(1)
    runs = [
        (f"FixedInterval({args.interval}), lr {args.lr}", hvd.FixedInterval(args.interval)),
        (f"TimeVarying.paper(lr0={args.lr0}, k0={args.k0}, lr_max={args.lr})",
         hvd.TimeVarying.paper(lr0=args.lr0, k0=args.k0, lr_max=args.lr)),
        ("TimeVarying([2,4,8,16,32], lrs=[.2,.2,.1,.1,.05])",
         hvd.TimeVarying([2, 4, 8, 16, 32], lrs=[0.2, 0.2, 0.1, 0.1, 0.05], repeat_last=True)),
    ]
    rows = []
    for name, schedule in runs:
        if hvd.rank() == 0:
            print(f"training with {name} ...", flush=True)
        rows.append((name, *train(schedule, args.steps, args.batch, args.lr)))
    if hvd.rank() == 0:
        print(f"\n{hvd.size()} ranks, {args.steps} steps of batch {args.batch} per rank, plain SGD")
        print(f"{'schedule':<52} {'test loss':>9} {'rounds':>6} {'wall s':>6}  first epochs (K^s, lr^s)")
        for name, loss, rounds, seconds, epochs in rows:
            first = " ".join(f"({k},{lr:.3g})" for k, lr in epochs[:5])
            print(f"{name:<52} {loss:>9.4f} {rounds:>6d} {seconds:>6.2f}  {first} ...")
        print("(rounds include the final finalize() average)")


if __name__ == "__main__":
    main()
