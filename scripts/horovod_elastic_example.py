"""Run Horovod's own elastic PyTorch example on 3 hosts and kill one host's worker mid-run.

    # Horovod's example, from its repository (examples/elastic/pytorch/):
    .venv/bin/python scripts/horovod_elastic_example.py PATH/pytorch_synthetic_benchmark_elastic.py
    .venv/bin/python scripts/horovod_elastic_example.py PATH/... --swap   # the one-line swap

Needs root (hosts on one machine, scripts/cluster.py). ``--swap`` runs a copy with
``hvd.DistributedLocalSGD(optimizer, interval=4, ...)`` for ``hvd.DistributedOptimizer(optimizer,
...)`` and ``import prsgd_hvd as hvd``; nothing else is changed. Where torchvision is missing, a
small stand-in ``torchvision.models.resnet50`` goes on the path (CPU-sized; the example only
builds the model by name). After ``--kill-after`` iterations the host3 worker is dropped from the
discovery list and SIGKILLed; after as many more, host3 is listed again. Passes when the job
exits 0 and rank 0 prints the example's final "Total img/sec on 3" line.
"""
import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))
from cluster import Cluster  # noqa: E402
from cluster_hosts import kill, launcher_env, pids_running  # noqa: E402

STAND_IN = '''import torch.nn as nn


def resnet50():
    """Stand-in for torchvision's resnet50 (not installed): a small CNN, 3x224x224 -> 1000."""
    return nn.Sequential(nn.Conv2d(3, 16, 7, stride=4, padding=3), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 1000))
'''


def swapped(source: str) -> str:
    out, n1 = re.subn(r"^import horovod\.torch as hvd$", "import prsgd_hvd as hvd", source,
                      flags=re.M)
    out, n2 = re.subn(r"hvd\.DistributedOptimizer\(optimizer,",
                      "hvd.DistributedLocalSGD(optimizer, interval=4,", out)
    if (n1, n2) != (1, 1):
        sys.exit(f"the swap did not apply once each ({n1}, {n2}): not the expected example")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("example")
    ap.add_argument("--swap", action="store_true")
    ap.add_argument("--kill-after", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hvd_elastic_example_"))
    script = tmp / Path(args.example).name
    source = Path(args.example).read_text()
    script.write_text(swapped(source) if args.swap else source)
    path = [str(tmp), str(REPO)]
    if importlib.util.find_spec("torchvision") is None:
        (tmp / "torchvision").mkdir()
        (tmp / "torchvision" / "__init__.py").write_text("from . import models  # noqa: F401\n")
        (tmp / "torchvision" / "models.py").write_text(STAND_IN)
    listed = tmp / "hosts"
    listed.write_text("host1:1\nhost2:1\nhost3:1\n")
    discover = tmp / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {listed}\n")
    discover.chmod(0o755)
    with Cluster(3, "1gbit", "prsgdhvdex") as c:
        cmd = c.exec_argv(1, [str(Path(sys.executable).parent / "horovodrun"), "--gloo",
                              "--network-interface", "eth0", "-np", "3", "--min-np", "2",
                              "--max-np", "3", "--host-discovery-script", str(discover),
                              "--blacklist-cooldown-range", "1", "2", sys.executable, str(script),
                              "--no-cuda", "--batch-size", "8", "--num-warmup-batches", "4",
                              "--num-batches-per-iter", "8", "--num-iters", "40"])
        env = dict(os.environ, **launcher_env(c), PYTHONPATH=os.pathsep.join(path),
                   OMP_NUM_THREADS="1", HOROVOD_GLOO_TIMEOUT_SECONDS="20")
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()

        def iters():
            return sum("Iter #" in line for line in list(lines))

        def wait_iters(n, limit):
            while iters() < n and proc.poll() is None and time.time() - t0 < limit:
                time.sleep(0.5)

        wait_iters(args.kill_after, 300)
        victims = pids_running(c, 3, script.name)
        print(f"[example] {time.time() - t0:.0f} s, {iters()} iterations: host3 dropped, its "
              f"worker {victims} killed", flush=True)
        listed.write_text("host1:1\nhost2:1\n")
        kill(victims)
        wait_iters(iters() + args.kill_after, 400)
        print(f"[example] {time.time() - t0:.0f} s, {iters()} iterations: host3 listed again",
              flush=True)
        listed.write_text("host1:1\nhost2:1\nhost3:1\n")
        try:
            proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    out = "".join(lines)
    (tmp / "output.txt").write_text(out)
    repeated = sorted({m for m in re.findall(r"Iter #(\d+):", out)
                       if len(re.findall(rf"Iter #{m}:", out)) > 1}, key=int)
    ok = proc.returncode == 0 and "Total img/sec on 3" in out
    print(f"[example] {'PASS' if ok else 'FAIL'}: exit {proc.returncode} after "
          f"{time.time() - t0:.0f} s; iterations logged twice (restored from a commit): "
          f"{repeated or 'none'}; final line: "
          f"{next((l.strip() for l in out.splitlines() if 'Total img/sec' in l), 'missing')}; "
          f"whole output: {tmp / 'output.txt'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
