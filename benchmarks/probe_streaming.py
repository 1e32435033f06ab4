"""Where a streamed round's time goes on hosts joined by a slow link (issue 22's "find out why").

Run under horovodrun on the cluster hosts (docs/cluster.md):

    scripts/cluster.sh up 3 100mbit
    scripts/cluster.sh hvd 1 horovodrun -np 3 -H "$(scripts/cluster.sh hosts)" --gloo \\
        --network-interface eth0 "$PWD/.venv/bin/python" benchmarks/probe_streaming.py

Each rank trains bench_cluster's 6.32M-parameter MLP with each variant in turn (same data, the
variants interleaved over ``--repeats``) and measures, over the steady state (from the end of
the first interval to the last interval boundary):

* steps/s, and the compute seconds per step (forward + backward + the optimizer's own update,
  timed on the main thread's CPU clock, so a step that waits is not counted);
* the seconds ``step()`` spent waiting for rounds (``stats()["exposed_comm_seconds"]``) and a
  round's life from start to arrival (``comm_seconds`` per round);
* the CPU seconds of every other thread of the process (Horovod's background thread, Gloo's),
  from /proc/self/task, per interval: what communication takes from the 2 shared cores;
* the bytes this rank sent per interval and the link time they need at ``--rate-mbit``
  (a ring allreduce moves 2(N-1)/N of the payload each way).

Rank 0 prints one row per variant (medians over ranks and repeats).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def thread_cpu_seconds():
    """CPU seconds (user + system) of each thread of this process, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def run(variant, args, hvd, torch, nn, model_fn, data):
    fragments, delay, fp16 = variant
    torch.manual_seed(0)
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = hvd.DistributedLocalSGD(opt, interval=args.interval, fragments=fragments, delay=delay,
                                  compression="fp16" if fp16 else None)
    loss_fn = nn.CrossEntropyLoss()
    xs, ys = data
    me = __import__("threading").get_native_id()
    compute = 0.0
    hvd.allreduce(torch.zeros(1), name="probe.barrier")
    marks = {}
    for t in range(1, args.steps + 1):
        i = t % xs.shape[0]
        c0 = time.thread_time()
        opt.zero_grad()
        loss_fn(model(xs[i]), ys[i]).backward()
        c1 = time.thread_time()
        opt.step()
        compute += c1 - c0
        if t == args.interval or t == args.steps:
            st = opt.stats()
            cpu = thread_cpu_seconds()
            marks[t] = (time.perf_counter(), compute, st["exposed_comm_seconds"],
                        st["comm_seconds"], st["rounds"], st["bytes_sent"],
                        sum(v for k, v in cpu.items() if k != me))
    opt.finalize()
    (w0, c0, e0, m0, r0, b0, o0), (w1, c1, e1, m1, r1, b1, o1) = marks[args.interval], marks[args.steps]
    steps = args.steps - args.interval
    intervals = steps / args.interval
    return {"steps_per_s": steps / (w1 - w0), "compute_per_step": (c1 - c0) / steps,
            "exposed_per_interval": (e1 - e0) / intervals,
            "round_life": (m1 - m0) / max(1, r1 - r0),
            "other_threads_cpu_per_interval": (o1 - o0) / intervals,
            "wall_per_interval": (w1 - w0) / intervals,
            "mb_per_interval": (b1 - b0) / intervals / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=int, default=16)
    ap.add_argument("--steps", type=int, default=16 * 9)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--variants", nargs="+",
                    default=["1,0,0", "1,8,0", "4,8,0", "1,0,1", "1,8,1", "4,8,1", "4,12,1"],
                    help="fragments,delay,fp16 triples")
    args = ap.parse_args()
    import torch
    from torch import nn

    import prsgd_hvd as hvd
    from bench_cluster import _models
    hvd.init()
    torch.set_num_threads(1)
    build, make_data = _models()["mlp6m"]
    g = torch.Generator().manual_seed(100 + hvd.rank())
    x, y = make_data(g, 64 * 32)  # 64 batches of 32
    data = (x.view(64, 32, -1), y.view(64, 32))
    variants = [tuple(int(x) for x in v.split(",")) for v in args.variants]
    results = {v: [] for v in variants}
    for rep in range(args.repeats):
        for v in variants[rep % len(variants):] + variants[:rep % len(variants)]:
            results[v].append(run(v, args, hvd, torch, nn, build, data))
    gathered = hvd.allgather_object(results, name="probe.results")
    if hvd.rank() != 0:
        return
    n = hvd.size()
    print(f"{n} ranks, MLP 6.32M, I={args.interval}, {args.steps} steps, medians over ranks x "
          f"{args.repeats} repeats; link time = MB x 2(N-1)/N / rate ({args.rate_mbit:g} Mbit/s)")
    head = ("F,delay,fp16", "steps/s", "wall/I s", "compute/I s", "waited/I s", "round life s",
            "link/I s", "other threads CPU/I s")
    print(" ".join(f"{h:>14}" for h in head))
    for v in variants:
        rows = [r for g in gathered for r in g[v]]
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        link = med["mb_per_interval"] * 8 / args.rate_mbit * (2 * (n - 1) / n)
        cells = (",".join(map(str, v)), f"{med['steps_per_s']:.2f}",
                 f"{med['wall_per_interval']:.2f}",
                 f"{med['compute_per_step'] * args.interval:.2f}",
                 f"{med['exposed_per_interval']:.2f}", f"{med['round_life']:.2f}", f"{link:.2f}",
                 f"{med['other_threads_cpu_per_interval']:.2f}")
        print(" ".join(f"{c:>14}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
