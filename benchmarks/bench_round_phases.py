"""Where one averaging round's time goes, against a bare Horovod allreduce of the same bytes.

Run under horovodrun (loopback, or across hosts with ``scripts/cluster.sh hvd``)::

    .venv/bin/horovodrun -np 3 --gloo .venv/bin/python benchmarks/bench_round_phases.py --mb 1
    bash scripts/cluster.sh up 3 1gbit
    bash scripts/cluster.sh hvd 1 horovodrun --gloo --network-interface eth0 \\
        -H host1:1,host2:1,host3:1 -np 3 $PWD/.venv/bin/python $PWD/benchmarks/bench_round_phases.py

Interleaved repeats, each after a barrier: the baseline is ``hvd.allreduce_async_`` of a tensor
of the round's size, waited for as rounds are (``prsgd_hvd.waiting``); then one round of ours
(``average_now()``), timed whole and by phase (``Averager.start``: pack and enqueue;
``PendingRound.wait``; the write-back). Rank 0 prints the medians and ours / baseline.
"""
import argparse
import statistics
import time

import torch
from torch import nn

import prsgd_hvd as hvd
from prsgd_hvd import averaging, local_sgd
from prsgd_hvd.waiting import synchronize_quietly

PHASES = (("start", averaging.Averager, "start"), ("wait", averaging.PendingRound, "wait"),
          ("write-back", local_sgd.LocalSGD, "_write_back"))


def timed(times, key, cls, name):
    """Wrap cls.name so that each call's duration is appended to times[key]."""
    f = getattr(cls, name)

    def wrapper(*a, **k):
        s = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            times[key].append(time.perf_counter() - s)
    setattr(cls, name, wrapper)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, nargs="+", default=[1.0, 25.0])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    for mb in args.mb:
        n = int(mb * 2**20 / 4)
        model = nn.Linear(n, 1, bias=False)  # one parameter of n elements
        opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.0), interval=10**9,
                                      named_parameters=model.named_parameters(), overlap=False)
        bare = torch.randn(n)
        times = {k: [] for k in ("allreduce polled", "ours", *(p[0] for p in PHASES))}
        opt.average_now()  # the first round also checks fingerprints: not timed
        originals = [(cls, name, getattr(cls, name)) for _, cls, name in PHASES]
        for key, cls, name in PHASES:
            timed(times, key, cls, name)
        for _ in range(args.repeats):
            for key in ("allreduce polled", "ours"):
                hvd.allreduce(torch.zeros(1), name="phases.barrier")
                s = time.perf_counter()
                if key == "ours":
                    opt.average_now()
                else:
                    synchronize_quietly(hvd, hvd.allreduce_async_(bare, op=hvd.Sum,
                                                                  name=f"phases.bare{mb}"))
                times[key].append(time.perf_counter() - s)
        for cls, name, f in originals:  # unwrapped for the next size
            setattr(cls, name, f)
        opt.finalize()
        if hvd.rank() == 0:
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            parts = ", ".join(f"{k} {med[k]:.2f} ms" for k, *_ in PHASES)
            print(f"{mb:g} MB, {hvd.size()} ranks, median of {args.repeats}: allreduce polled "
                  f"{med['allreduce polled']:.2f} ms, ours {med['ours']:.2f} ms "
                  f"({med['ours'] / med['allreduce polled']:.2f}x; {parts}; the rest "
                  f"{med['ours'] - sum(med[k] for k, *_ in PHASES):.2f} ms)", flush=True)


if __name__ == "__main__":
    main()
