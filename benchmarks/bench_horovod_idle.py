"""What an idle Horovod rank costs, by ``HOROVOD_CYCLE_TIME``.

Under local SGD, Horovod has nothing queued almost all the time, yet its background thread
wakes every cycle (1 ms by default) and coordinates with the other ranks. This launches
``horovodrun -np N --gloo`` once per cycle time; each rank only runs ``hvd.init()`` and sleeps,
and reports its process CPU time over the sleep as a share of one core. Printed: each rank's
share, their median, and that median as a ratio of the default's (measured in the same run).

    .venv/bin/python benchmarks/bench_horovod_idle.py                 # 1 (default), 5, 20 ms
    .venv/bin/python benchmarks/bench_horovod_idle.py --cycle-ms 1 20 --seconds 20

``--steps N`` measures instead what the cycle time costs a job that communicates: each rank
trains a small MLP (quickstart's, batch 32) for N steps with ``hvd.DistributedOptimizer`` (an
allreduce every step, so every step waits for the background thread's next cycle) and with
``DistributedLocalSGD(interval=16)``, and reports steps/s, as a ratio to the first cycle time.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(seconds: float) -> None:
    import horovod.torch as hvd
    hvd.init()
    time.sleep(2)  # past start-up
    c0, t0 = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    share = (time.process_time() - c0) / (time.perf_counter() - t0)
    print("IDLE " + json.dumps({"rank": hvd.rank(), "share": share}), flush=True)


def train(steps: int) -> None:
    import torch
    from torch import nn

    import prsgd_hvd as hvd
    hvd.init()
    torch.set_num_threads(1)
    for name in ("DistributedOptimizer", "DistributedLocalSGD(I=16)"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters()) \
            if name == "DistributedOptimizer" else hvd.DistributedLocalSGD(opt, interval=16)
        x, y = torch.randn(32, 32), torch.randint(0, 10, (32,))
        for i in range(steps + 10):  # 10 warm-up steps
            if i == 10:
                t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        rate = steps / (time.perf_counter() - t0)
        if hasattr(opt, "finalize"):
            opt.finalize()
        print("STEPS " + json.dumps({"rank": hvd.rank(), "job": name, "steps_per_s": rate}),
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycle-ms", nargs="+", type=float, default=[1, 5, 20],
                    help="the first is the baseline (Horovod's default is 1)")
    ap.add_argument("--np", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=0,
                    help="measure steps/s of a communicating job instead of idle CPU")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return train(args.steps) if args.steps else worker(args.seconds)
    if args.steps:
        return steps_per_second(args)
    horovodrun = str(Path(sys.executable).parent / "horovodrun")
    medians = {}
    for ms in args.cycle_ms:
        env = dict(os.environ, HOROVOD_CYCLE_TIME=str(ms))
        out = subprocess.run([horovodrun, "-np", str(args.np), "--gloo", sys.executable, __file__,
                              "--worker", "--seconds", str(args.seconds)],
                             env=env, capture_output=True, text=True, timeout=120 + args.seconds)
        shares = sorted(json.loads(line.split("IDLE ", 1)[1])["share"]
                        for line in out.stdout.splitlines() if "IDLE " in line)
        if len(shares) != args.np:
            sys.exit(f"the run at {ms} ms failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        medians[ms] = statistics.median(shares)
        base = medians[args.cycle_ms[0]]
        print(f"HOROVOD_CYCLE_TIME={ms:g} ms: idle CPU per rank "
              f"{', '.join(f'{s:.1%}' for s in shares)} of a core; median {medians[ms]:.1%} "
              f"({medians[ms] / base:.2f}x the {args.cycle_ms[0]:g} ms baseline)", flush=True)


def steps_per_second(args) -> None:
    horovodrun = str(Path(sys.executable).parent / "horovodrun")
    base = {}
    for ms in args.cycle_ms:
        env = dict(os.environ, HOROVOD_CYCLE_TIME=str(ms))
        out = subprocess.run([horovodrun, "-np", str(args.np), "--gloo", sys.executable, __file__,
                              "--worker", "--steps", str(args.steps)],
                             env=env, capture_output=True, text=True, timeout=600)
        rows = [json.loads(line.split("STEPS ", 1)[1]) for line in out.stdout.splitlines()
                if "STEPS " in line]
        if len(rows) != 2 * args.np:
            sys.exit(f"the run at {ms} ms failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        for job in dict.fromkeys(r["job"] for r in rows):
            rate = statistics.median(r["steps_per_s"] for r in rows if r["job"] == job)
            base.setdefault(job, rate)
            print(f"HOROVOD_CYCLE_TIME={ms:g} ms: {job:<26} {rate:8.1f} steps/s "
                  f"({rate / base[job]:.2f}x the {args.cycle_ms[0]:g} ms run)", flush=True)


if __name__ == "__main__":
    main()
