"""Local SGD where it is meant to run: hosts joined by a network slower than their compute.

    sudo python benchmarks/bench_cluster.py                       # make bench-cluster
    sudo python benchmarks/bench_cluster.py --hosts 3 --rates 100mbit --models mlp6m --repeats 3

Brings up N hosts on this machine (scripts/cluster.py: network namespaces with sshd, ``tbf`` on
both ends of every link), and for each link rate launches ONE ``horovodrun -H host1:1,...`` job
(this file, ``--worker``) that runs every variant on the same ranks, interleaved, ``--repeats``
times:

* ``hvd.DistributedOptimizer``: a gradient allreduce every step -- the baseline of every ratio;
* ``DistributedLocalSGD(I)``, I = 4, 16, and I = 16 with fp16 deltas (``compression="fp16"``);
* PyTorch's own local SGD: ``torch.distributed.optim.PostLocalSGDOptimizer`` with a
  ``PeriodicModelAverager(period=I)`` over a gloo process group on the same hosts and link;
* PyTorch ``DistributedDataParallel`` (gloo);
* no communication: the same ranks training alone -- the ceiling.

Torch's process group is opened inside the same workers (rendezvous at host1), so every variant
runs in the same processes, each rank in its own ssh session (the kernel shares CPU per session:
ranks of one session got 2-3x less CPU under load). The Horovod variants' background thread keeps
cycling during the torch variants (``HOROVOD_CYCLE_TIME``; see docs/cluster.md).

Per variant: steps/s (rank 0's clock between two barriers; a synchronous variant at a slow link
stops after ``--max-seconds`` once it has run ``--min-steps``, a local-SGD one at the next round
boundary), its median over repeats with the range, as a ratio to DistributedOptimizer and as a
share of the no-communication ceiling. The data are learnable (a fixed random teacher labels
Gaussian inputs / class patterns; each rank its own shard), so the mean training loss over ranks
at equal steps and the **time to a target loss** mean something: the target is
DistributedOptimizer's loss at the end of its full-length run on the fastest link, steps to it
come from that run (the trajectory does not depend on the link), and time to it is those steps
divided by the steps/s on each link. A yardstick per link: one collective of the MLP's 25 MB and
of ResNet-20's 1 MB with ``hvd.allreduce`` (Horovod's spinning wait), the same polled with
sleeps (``prsgd_hvd.waiting``), Horovod's reduce-scatter + allgather, and
``torch.distributed.all_reduce``; one averaging round of ours (``average_now()``) and torch's
(``average_parameters``); against the ring's link limit 2(N-1)/N x bytes / rate.

Needs root and openssh-server (``make setup-cluster``). Takes about 10-15 minutes per link rate
with the defaults on 2 loaded cores (35 minutes for the three).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))   # cluster.py (the orchestrator's side)

# ---------------------------------------------------------------------------------------------
# Worker: runs under horovodrun on the hosts.
# ---------------------------------------------------------------------------------------------


def _models():
    import torch
    from torch import nn

    sys.path.insert(0, str(REPO / "examples"))
    from resnet20_cifar10 import ResNet20

    def mlp():
        return nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                             nn.Linear(2048, 10))

    def mlp_data(g, n):
        teacher = torch.randn(1024, 10, generator=torch.Generator().manual_seed(7))
        x = torch.randn(n, 1024, generator=g)
        return x, (x @ teacher).argmax(1)

    def image_data(g, n):
        patterns = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        y = torch.randint(0, 10, (n,), generator=g)
        return patterns[y] + 2.0 * torch.randn(n, 3, 32, 32, generator=g), y

    return {"mlp6m": (mlp, mlp_data), "resnet20": (ResNet20, image_data)}


VARIANTS = ["distopt", "ours4", "ours16", "ours16fp16", "plsgd4", "plsgd16", "ddp", "nocomm"]
# Not in the default set: ours without overlapping the round with the next step's compute.
EXTRA_VARIANTS = ["ours4seq", "ours16seq"]
LABELS = {"distopt": "hvd.DistributedOptimizer", "ours4": "DistributedLocalSGD I=4",
          "ours16": "DistributedLocalSGD I=16", "ours16fp16": "DistributedLocalSGD I=16 fp16",
          "plsgd4": "torch PostLocalSGD I=4", "plsgd16": "torch PostLocalSGD I=16",
          "ddp": "torch DDP", "nocomm": "no communication",
          "ours4seq": "DistributedLocalSGD I=4 no overlap",
          "ours16seq": "DistributedLocalSGD I=16 no overlap"}


def _interval(variant):
    digits = "".join(ch for ch in variant if ch.isdigit())
    return int(digits[:2]) if variant.startswith(("ours", "plsgd")) else 1


def run_variant(variant, build, data, init_state, steps, max_seconds, args):
    import torch
    import torch.distributed as dist
    from torch import nn

    import prsgd_hvd as hvd

    model = build()
    model.load_state_dict(init_state)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    interval = _interval(variant)
    if variant == "distopt":
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    elif variant.startswith("ours"):
        opt = hvd.DistributedLocalSGD(opt, interval=interval, named_parameters=model.named_parameters(),
                                      compression="fp16" if variant.endswith("fp16") else None,
                                      overlap=not variant.endswith("seq"))
    elif variant.startswith("plsgd"):
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer
        opt = PostLocalSGDOptimizer(opt, PeriodicModelAverager(period=interval, warmup_steps=0))
    elif variant == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    loss_fn = nn.CrossEntropyLoss()
    xs, ys = data
    losses = []
    dist.barrier()
    start = time.perf_counter()
    done = 0
    for t in range(steps):
        i = t % xs.shape[0]
        opt.zero_grad()
        loss = loss_fn(model(xs[i]), ys[i])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        done = t + 1
        # Stop a slow variant early, at the same step on every rank (rank 0's clock decides),
        # after at least one full period (a round) and --min-steps.
        if (max_seconds and done >= max(args.min_steps, interval) and done % interval == 0
                and done < steps):
            flag = torch.tensor([float(time.perf_counter() - start > max_seconds)])
            dist.broadcast(flag, 0)   # tiny; a stop check per round, not per step
            if flag.item():
                break
    dist.barrier()
    seconds = time.perf_counter() - start
    if variant.startswith("ours"):
        opt.finalize()
    curve = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(curve)
    return {"seconds": seconds, "steps": done, "loss": (curve / dist.get_world_size()).tolist()}


def yardstick(sizes_mb, repeats):
    """One allreduce / averaging round of each size with Horovod and with torch's gloo."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    import prsgd_hvd as hvd
    from prsgd_hvd.waiting import synchronize_quietly

    out = {}
    for mb in sizes_mb:
        n = int(mb * 2**20 / 4)
        t = torch.randn(n)
        model = nn.Linear(n, 1, bias=False)     # one parameter tensor of n elements
        opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.0), interval=10**9,
                                      named_parameters=model.named_parameters(), overlap=False)
        times = {"hvd.allreduce": [], "hvd.allreduce polled": [], "hvd reducescatter+allgather": [],
                 "torch all_reduce": [], "ours average_now": [], "torch average_parameters": []}
        for _ in range(repeats):
            for name in times:
                dist.barrier()
                s = time.perf_counter()
                if name == "hvd.allreduce":          # Horovod's synchronize: spins while waiting
                    hvd.allreduce(t, op=hvd.Sum, name=f"yard.{mb}")
                elif name == "hvd.allreduce polled":  # the same, waited for as our rounds are
                    synchronize_quietly(hvd, hvd.allreduce_async(t, op=hvd.Sum, name=f"yard.p{mb}"))
                elif name == "hvd reducescatter+allgather":
                    part = synchronize_quietly(hvd, hvd.reducescatter_async(
                        t, op=hvd.Sum, name=f"yard.rs{mb}"))
                    synchronize_quietly(hvd, hvd.allgather_async(part, name=f"yard.ag{mb}"))
                elif name == "torch all_reduce":
                    dist.all_reduce(t)
                elif name == "ours average_now":
                    opt.average_now()
                else:
                    average_parameters(model.parameters(), dist.group.WORLD)
                times[name].append(time.perf_counter() - s)
        opt.finalize()
        out[str(mb)] = {k: statistics.median(v) for k, v in times.items()}
    return out


def worker(args):
    import torch
    import torch.distributed as dist

    import prsgd_hvd as hvd

    hvd.init()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:29511",
                            rank=hvd.rank(), world_size=hvd.size())
    models = _models()
    result = {"size": hvd.size(), "models": {}}
    if args.yardstick:
        result["yardstick"] = yardstick([25.0, 1.0], args.repeats)
    for name in args.models:
        build, make_data = models[name]
        torch.manual_seed(0)
        init_state = build().state_dict()
        g = torch.Generator().manual_seed(100 + hvd.rank())
        batches = [make_data(g, 32) for _ in range(args.data_batches)]
        data = (torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches]))
        steps = args.steps[args.models.index(name)] if len(args.steps) > 1 else args.steps[0]
        runs = {v: [] for v in args.variants}
        for rep in range(args.repeats):
            order = args.variants[rep % len(args.variants):] + args.variants[:rep % len(args.variants)]
            for v in order:           # interleaved; the start rotates so no variant always leads
                cap = 0 if rep < args.full_repeats else args.max_seconds
                runs[v].append(run_variant(v, build, data, init_state, steps, cap, args))
        result["models"][name] = {"steps": steps, "runs": runs,
                                  "params": sum(p.numel() for p in build().parameters())}
    if hvd.rank() == 0:
        Path(args.result).write_text(json.dumps(result))
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# Orchestrator: brings the hosts up, one job per link rate, prints the tables.
# ---------------------------------------------------------------------------------------------


def _smooth(curve, w=8):
    return [statistics.fmean(curve[max(0, i - w + 1):i + 1]) for i in range(len(curve))]


def summarize(results, hosts):
    """results: {rate: worker result}. Returns (text, rows for the plot)."""
    lines, plot = [], []
    rates = list(results)
    ref_rate = rates[-1]             # the fastest link (listed last): full-length loss runs
    for model in next(iter(results.values()))["models"]:
        ref = results[ref_rate]["models"][model]
        curves = {v: _smooth(statistics_median_curve(r)) for v, r in ref["runs"].items()}
        at = round(0.75 * ref["steps"])
        base = "distopt" if "distopt" in curves else next(iter(curves))
        target = curves[base][at - 1]
        steps_to = {v: next((i + 1 for i, l in enumerate(c) if l <= target), None)
                    for v, c in curves.items()}
        n_params = ref["params"]
        lines.append(f"\n{hosts} hosts, {model} ({n_params / 1e6:.2f}M params), batch 32/rank; "
                     f"target loss {target:.3f} ({LABELS[base]}'s after {at} of {ref['steps']} "
                     f"steps, smoothed over 8; losses and steps to target from the full-length "
                     f"runs on the fastest link)")
        lines.append(f"{'link':<8} {'variant':<36} {'steps/s (range)':>20} {'vs DistOpt':>10} "
                     f"{'vs torch':>8} {'of ceiling':>10} {'loss@' + str(ref['steps']):>9} "
                     f"{'time to target':>15}")
        for rate in rates:
            runs = results[rate]["models"][model]["runs"]
            rate_of = {v: [r["steps"] / r["seconds"] for r in rs] for v, rs in runs.items()}
            med = {v: statistics.median(x) for v, x in rate_of.items()}
            for v in runs:
                st = steps_to.get(v)
                ttt = f"{st / med[v]:.1f} s ({st} st)" if st else "not reached"
                loss = curves[v][-1] if v in curves and len(curves[v]) == ref["steps"] else float("nan")
                lines.append(
                    f"{rate:<8} {LABELS[v]:<36} {med[v]:>7.2f} ({min(rate_of[v]):.2f}-"
                    f"{max(rate_of[v]):.2f}) {_ratio(med, v, 'distopt', '.2f', 'x'):>10} "
                    f"{_ratio(med, v, _torch_twin(v), '.2f', 'x'):>8} "
                    f"{_ratio(med, v, 'nocomm', '.0%'):>10} {loss:>9.3f} {ttt:>15}")
                plot.append({"model": model, "rate": rate, "variant": v, "steps_per_s": med[v],
                             "time_to_target": st / med[v] if st else None})
    for rate in rates:
        y = results[rate].get("yardstick")
        if not y:
            continue
        lines.append(f"\nyardstick at {rate}, {hosts} hosts (median of repeats; link limit = "
                     f"2(N-1)/N x bytes / rate)")
        for mb, times in y.items():
            limit = _link_limit(float(mb) * 2**20, hosts, rate)
            parts = [f"{k} {v * 1e3:.0f} ms" + (f" ({limit / v:.0%})" if limit else "")
                     for k, v in times.items()]
            lines.append(f"  {mb:>4} MB: " + ", ".join(parts)
                         + (f"; limit {limit * 1e3:.0f} ms" if limit else ""))
    return "\n".join(lines), plot


def _torch_twin(variant):
    """PyTorch's local SGD at the same interval, the comparison that matters for ours."""
    if variant.startswith("ours") and not variant.endswith("fp16"):
        return f"plsgd{_interval(variant)}"
    return None


def _ratio(med, v, base, fmt, suffix=""):
    """med[v] / med[base], or '-' where the base variant did not run."""
    if base is None or base not in med or base == v:
        return "-"
    return f"{med[v] / med[base]:{fmt}}{suffix}"


def statistics_median_curve(runs):
    """Loss per step, the median over repeats (runs cut early are shorter: use the full ones)."""
    full = max(len(r["loss"]) for r in runs)
    curves = [r["loss"] for r in runs if len(r["loss"]) == full]
    return [statistics.median(c[i] for c in curves) for i in range(full)]


def _link_limit(nbytes, n, rate):
    """The ring allreduce's time at the link rate: each rank sends 2(N-1)/N of the bytes."""
    return None if rate == "none" else 2 * (n - 1) / n * nbytes * 8 / _bits(rate)


def plot(rows, path, hosts):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    width = 0.8 / len(variants)
    for col, model in enumerate(models):
        for row, key, title in ((0, "steps_per_s", "steps/s"), (1, "time_to_target",
                                                                   "time to target loss (s)")):
            ax = axes[row][col]
            for k, v in enumerate(variants):
                ys = [next((r[key] for r in rows if r["model"] == model and r["rate"] == rate
                            and r["variant"] == v), None) for rate in rates]
                xs = [i + k * width for i in range(len(rates))]
                ax.bar(xs, [y if y is not None else 0 for y in ys], width, label=LABELS[v])
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rates))])
            ax.set_xticklabels(["unshaped" if r == "none" else r for r in rates])
            ax.set_title(f"{model}, {hosts} hosts: {title}")
            if row == 1:
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def orchestrate(args):
    from cluster import Cluster, missing_requirements

    why = missing_requirements()
    if why:
        sys.exit(f"bench_cluster: {why}")
    rates = sorted(args.rates, key=lambda r: float("inf") if r == "none" else _bits(r))
    results = {}
    with Cluster(args.hosts, None, name="prsgdbench") as c:
        for kv in args.sysctl:
            for i in range(1, args.hosts + 1):
                subprocess.run(c.exec_argv(i, ["sysctl", "-q", "-w", kv]), check=True)
        for rate in rates:
            c.shape(rate)
            out = Path(tempfile.mkdtemp(prefix="prsgd_bench_cluster_")) / "result.json"
            steps = args.steps
            cmd = c.exec_argv(1, [
                str(Path(sys.executable).parent / "horovodrun"), "-np", str(args.hosts),
                "-H", c.hosts_arg(1), "--gloo", "--network-interface", "eth0",
                sys.executable, str(Path(__file__).resolve()), "--worker", "--result", str(out),
                "--master", c.host(1), "--models", *args.models, "--steps", *map(str, steps),
                "--repeats", str(args.repeats), "--variants", *args.variants,
                "--max-seconds", str(args.max_seconds),
                "--full-repeats", str(1 if rate == rates[-1] else 0),
                "--min-steps", str(args.min_steps), "--lr", str(args.lr)]
                + (["--yardstick"] if args.yardstick else []))
            env = c.env(venv_bin=str(Path(sys.executable).parent))
            env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="eth0",
                       PYTHONPATH=str(REPO))
            for kv in args.hvd_env:
                k, _, v = kv.partition("=")
                env[k] = v
            for attempt in (1, 2):  # a job that fails is run once more, then left out
                t0 = time.time()
                print(f"[bench_cluster] {args.hosts} hosts at {rate}: {' '.join(args.models)}"
                      + (" (second attempt)" if attempt == 2 else ""), flush=True)
                proc = subprocess.run(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, timeout=args.timeout)
                if proc.returncode == 0 and out.exists():
                    results[rate] = json.loads(out.read_text())
                    print(f"[bench_cluster]   done in {time.time() - t0:.0f} s", flush=True)
                    break
                log = out.parent / f"job-{rate}-{attempt}.log"
                log.write_text(proc.stdout)
                print(proc.stdout[-3000:])
                print(f"[bench_cluster]   the job at {rate} failed ({proc.returncode}); its whole "
                      f"output: {log}", flush=True)
            if args.json:  # after every rate, so a later failure loses nothing
                Path(args.json).write_text(json.dumps(results))
        if not results:
            sys.exit("bench_cluster: every job failed")
    text, rows = summarize(results, args.hosts)
    settings = " ".join(args.hvd_env + args.sysctl)
    if settings:
        text = f"settings: {settings}\n" + text
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    if args.plot:
        plot(rows, args.plot, args.hosts)
        print(f"\nplot: {args.plot}")


def _bits(rate):
    from cluster import rate_bits
    return rate_bits(rate)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--rates", nargs="+", default=["100mbit", "1gbit", "none"],
                    help="tc rates, or none (unshaped); the fastest gives the full-length loss runs")
    ap.add_argument("--models", nargs="*", default=["mlp6m", "resnet20"],
                    help="none: only the yardstick")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS + EXTRA_VARIANTS)
    ap.add_argument("--steps", type=int, nargs="+", default=[48],
                    help="steps per variant and repeat (one value, or one per model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=10.0,
                    help="stop a variant after this long (once it ran --min-steps and a full "
                         "period, at a round boundary), except in the first repeat on the "
                         "fastest link, which runs every variant full length for the losses")
    ap.add_argument("--min-steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--yardstick", action="store_true", help="also time bare allreduces and rounds")
    ap.add_argument("--hvd-env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Horovod settings for the job, e.g. HOROVOD_CYCLE_TIME=20")
    ap.add_argument("--sysctl", nargs="*", default=[], metavar="KEY=VALUE",
                    help="set on every host, e.g. net.ipv4.tcp_slow_start_after_idle=0")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", default=None, help="write every run's raw figures here")
    ap.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    # worker side
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--master", help=argparse.SUPPRESS)
    ap.add_argument("--data-batches", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--full-repeats", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
