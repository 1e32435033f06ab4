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
               "average_state": {"average_state": True}}
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    hvd.init()
    out = {name: case(name, hvd.rank())
           for name in ["agree", "interval", "shape", "warmup", "schedule_kind", "overlap",
                        "compression", "optimizer", "average_state", "outer_lr",
                        "outer_missing"]}
    torch.save(out, f"{args.out}/rank{hvd.rank()}.pt")


if __name__ == "__main__":
    main()
