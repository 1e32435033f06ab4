"""Ranks that disagree must all get a clear error at construction, not hang in a round.

Each case makes rank 1 differ; every rank records the error it got (or None).
"""
import argparse

import torch
from torch import nn

import prsgd_hvd as hvd


def case(name, rank):
    torch.manual_seed(0)
    width = 5 if (name == "shape" and rank == 1) else 4
    model = nn.Sequential(nn.Linear(3, width), nn.Linear(width, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    interval = 3 if (name == "interval" and rank == 1) else 4
    warmup = 2 if (name == "warmup" and rank == 1) else 0
    if name == "schedule_kind" and rank == 1:
        interval = hvd.TimeVarying([4, 4])
    try:
        hvd.DistributedLocalSGD(opt, interval=interval, warmup_steps=warmup,
                                named_parameters=model.named_parameters())
        return None
    except ValueError as exc:
        return str(exc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    hvd.init()
    out = {name: case(name, hvd.rank())
           for name in ["agree", "interval", "shape", "warmup", "schedule_kind"]}
    torch.save(out, f"{args.out}/rank{hvd.rank()}.pt")


if __name__ == "__main__":
    main()
