"""Ranks that disagree must all get a clear error at construction, not hang in a round.

Each case makes rank 1 differ; every rank records the error it got (or None).
"""
import argparse

import torch
from torch import nn

import prsgd_hvd as hvd
from prsgd_hvd.outer import diloco


def case(name, rank):
    torch.manual_seed(0)
    width = 5 if (name == "shape" and rank == 1) else 4
    model = nn.Sequential(nn.Linear(3, width), nn.Linear(width, 2))
    differs = rank == 1
    cls = torch.optim.Adam if (name == "optimizer" and differs) else torch.optim.SGD
    opt = cls(model.parameters(), lr=0.1)
    interval = 3 if (name == "interval" and differs) else 4
    warmup = 2 if (name == "warmup" and differs) else 0
    if name == "schedule_kind" and differs:
        interval = hvd.TimeVarying([4, 4])
    # Options documented (docs/robustness.md) as compared across ranks: rank 1 flips one.
    options = {"overlap": {"overlap": False},
               "compression": {"compression": hvd.Compression.fp16},
               "average_state": {"average_state": True},
               "delay": {"delay": 2}, "fragments": {"fragments": 2}}
    extra = options.get(name, {}) if differs else {}
    if name == "outer_lr":  # every rank has an outer optimizer; rank 1's learning rate differs
        extra = {"outer": diloco(lr=0.6 if differs else 0.7)}
    if name == "outer_missing" and not differs:  # rank 1 has none
        extra = {"outer": diloco()}
    try:
        hvd.DistributedLocalSGD(opt, interval=interval, warmup_steps=warmup,
                                named_parameters=model.named_parameters(), **extra)
        return None
    except ValueError as exc:
        return str(exc)


def outer_broadcast(rank):
    """The standard resume with an outer optimizer: rank 0 holds theta0 and outer momentum of
    its own (as if it had loaded a checkpoint), hvd.broadcast_optimizer_state carries them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), interval=100,
                                  outer=diloco(lr=0.7, momentum=0.9))
    outer = opt._local_sgd.outer
    if rank == 0:
        with torch.no_grad():
            for i, th in enumerate(outer.theta):
                th.fill_(float(i + 1))
                th.grad = torch.ones_like(th)
        outer.opt.step()  # Nesterov's first step: buffer 1, theta -= 0.7 * (1 + 0.9 * 1)
        outer.started = True
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    return {"theta": [t.clone() for t in outer.theta], "started": outer.started,
            "momentum": [outer.opt.state[t]["momentum_buffer"].clone()
                         if "momentum_buffer" in outer.opt.state.get(t, {}) else None
                         for t in outer.theta]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    hvd.init()
    out = {name: case(name, hvd.rank())
           for name in ["agree", "interval", "shape", "warmup", "schedule_kind", "overlap",
                        "compression", "optimizer", "average_state", "outer_lr",
                        "outer_missing", "delay", "fragments"]}
    out["outer_broadcast"] = outer_broadcast(hvd.rank())
    torch.save(out, f"{args.out}/rank{hvd.rank()}.pt")


if __name__ == "__main__":
    main()
