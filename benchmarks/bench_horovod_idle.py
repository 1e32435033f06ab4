"""What an idle Horovod rank costs, by ``HOROVOD_CYCLE_TIME``.

Under local SGD, Horovod has nothing queued almost all the time, yet its background thread
wakes every cycle (1 ms by default) and coordinates with the other ranks. This launches
``horovodrun -np N --gloo`` once per cycle time; each rank only runs ``hvd.init()`` and sleeps,
and reports its process CPU time over the sleep as a share of one core. Printed: each rank's
share, their median, and that median as a ratio of the default's (measured in the same run).

    .venv/bin/python benchmarks/bench_horovod_idle.py                 # 1 (default), 5, 20 ms
    .venv/bin/python benchmarks/bench_horovod_idle.py --cycle-ms 1 20 --seconds 20
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycle-ms", nargs="+", type=float, default=[1, 5, 20],
                    help="the first is the baseline (Horovod's default is 1)")
    ap.add_argument("--np", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.seconds)
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


if __name__ == "__main__":
    main()
