"""A few rounds with Horovod's timeline on (HOROVOD_TIMELINE set by the test)."""
import argparse

import torch

import prsgd_hvd as hvd
from common import loss_fn, make_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    hvd.init()
    model = make_model(0)
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), interval=2)
    for t in range(1, 7):
        opt.zero_grad()
        loss_fn(model, 0, hvd.rank(), t).backward()
        opt.step()
    opt.finalize()
    torch.save(opt.stats(), f"{args.out}/rank{hvd.rank()}.pt")
    hvd.shutdown()  # stops Horovod's background thread, which flushes the timeline file


if __name__ == "__main__":
    main()
