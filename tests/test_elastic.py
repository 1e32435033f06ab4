"""Elastic training under Horovod's real elastic launcher: the job grows from 2 to 3 workers.

A killed worker is not tested: on one host, Horovod 0.28 blacklists the failed worker's host
(localhost, every slot) and stops the job; that needs several hosts (test_cluster_elastic.py).

Values: examples/elastic.py --out saves what every worker (re)starts from; each phase between
two (re)starts is held to a float64 run of the example's model and data (check_elastic_run).
"""
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import simulate_rounds
from reference_outer import OuterReference
from reference_streaming import fragment_split

REPO = Path(__file__).resolve().parent.parent
TOL = dict(rtol=1e-4, atol=1e-5)  # hundreds of fp32 steps against float64
# The "outer" case's outer optimizer: DiLoCo's Nesterov SGD, at a smaller lr than DiLoCo's 0.7
# because its interval is 4, not hundreds: with this inner SGD (lr 0.05, momentum 0.9) lr 0.7 and
# momentum 0.9 diverge in float64 within 300 steps; lr 0.3 converges.
OUTER = dict(lr=0.3, momentum=0.9, nesterov=True)


def _example_model():
    torch.manual_seed(0)  # examples/elastic.py's model
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)).double()


@torch.no_grad()
def _restore(starts):
    """The reference workers of a phase: worker i's model and SGD at starts[i]'s parameters and
    momentum."""
    models = [_example_model() for _ in starts]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for m, o, snap in zip(models, opts, starts):
        for p, v, buf in zip(m.parameters(), snap["params"], snap["momentum"]):
            p.copy_(v)
            if buf is not None:
                o.state[p]["momentum_buffer"] = buf.double().clone()
    return models, opts


def _backward(model, opt, r: int, t: int) -> None:
    """Worker r's gradient at local step t: examples/elastic.py's batch of state.step == t - 1."""
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1000 * r + t - 1))
    opt.zero_grad()
    with torch.enable_grad():
        F.mse_loss(model(x.double()), x[:, :1].sin().double()).backward()


def _phase(starts, until, interval):
    """Float64 run of examples/elastic.py on len(starts) workers, worker i from starts[i] (its
    parameters, momentum and step), up to step ``until``; returns the models and optimizers."""
    s = starts[0]["step"]
    models, opts = _restore(starts)

    def grad(r, k):  # local step s + k
        _backward(models[r], opts[r], r, s + k)
    n = until - s
    rounds = [k for k in range(1, n + 1) if (s + k) % interval == 0]
    simulate_rounds(models, opts, grad, [n] * len(starts), [rounds] * len(starts), finalize=False)
    return models, opts


@torch.no_grad()
def _outer_phase(starts, until, interval, outer):
    """_phase with an outer optimizer (tests/reference_outer.py's rules): each worker also starts
    from its snapshot's theta0 and outer momentum (they travel with the commit); the round
    before the update of step t (t mod interval == 0) averages, steps the outer SGD on
    theta0 - average, and every model <- theta0. Returns the models, optimizers and each
    worker's OuterReference."""
    s = starts[0]["step"]
    models, opts = _restore(starts)
    refs = []
    for m, snap in zip(models, starts):
        ref = OuterReference([m], outer)  # theta0 = the parameters: x^0 before the first step
        saved = snap["outer"]
        if saved["started"]:
            for th, a in zip(ref.theta, saved["anchor"]):
                th.copy_(a)
        for i, st in saved["optimizer"]["state"].items():  # the outer momentum, by position
            ref.opt.state[ref.theta[i]]["momentum_buffer"] = st["momentum_buffer"].double().clone()
        refs.append(ref)
    for t in range(s + 1, until + 1):
        for r, (m, o) in enumerate(zip(models, opts)):
            _backward(m, o, r, t)
        if t % interval == 0:
            for ps in zip(*(m.parameters() for m in models)):
                mean = torch.stack(ps).mean(0)
                for p in ps:
                    p.copy_(mean)
            for m, ref in zip(models, refs):
                ref.outer_round([m])
        for o in opts:
            o.step()
    return models, opts, refs


def _close_outer(snap, ref, what):
    """A snapshot's theta0 and outer momentum against a worker's OuterReference."""
    saved = snap["outer"]
    for i, (got, th) in enumerate(zip(saved["anchor"], ref.theta)):
        torch.testing.assert_close(got.double(), th, **TOL, msg=lambda m: f"{what}, theta0 {i}: {m}")
    state = saved["optimizer"]["state"]
    want = {i: ref.opt.state[th]["momentum_buffer"] for i, th in enumerate(ref.theta)
            if "momentum_buffer" in ref.opt.state.get(th, {})}
    assert sorted(state) == sorted(want), f"{what}: outer momentum of params {sorted(state)}, want {sorted(want)}"
    for i, w in want.items():
        torch.testing.assert_close(state[i]["momentum_buffer"].double(), w, **TOL,
                                   msg=lambda m: f"{what}, outer momentum {i}: {m}")


@torch.no_grad()
def _stream_phase(starts, until, interval, fragments, delay):
    """_phase with streaming rounds (tests/reference_streaming.py's rules): each worker starts
    from its snapshot's rounds in flight too; fragment p's round starts before the update of
    step t with (t - p*I/F) mod I == 0 and merges before the update of step t + delay.
    Returns the models, optimizers and each worker's rounds still in flight at ``until``."""
    s = starts[0]["step"]
    models, opts = _restore(starts)
    pending = []
    for snap in starts:
        pending.append([(e["merge_at"], {k[1]: c.double() for k, c in e["correction"].items()})
                        for e in snap["in_flight"]])
    params = [list(m.parameters()) for m in models]
    split = fragment_split(list(_example_model().float().parameters()), fragments)
    gap = interval // fragments
    for t in range(s + 1, until + 1):
        for r, (m, o) in enumerate(zip(models, opts)):
            _backward(m, o, r, t)
            for merge_at, corr in [e for e in pending[r] if e[0] <= t]:
                for i, c in corr.items():
                    params[r][i].add_(c)
            pending[r] = [e for e in pending[r] if e[0] > t]
        if t % gap == 0:
            frag = split[(t // gap) % fragments]
            mean = {i: torch.stack([ps[i] for ps in params]).mean(0) for i in frag}
            for r in range(len(models)):
                pending[r].append((t + delay, {i: mean[i] - params[r][i] for i in frag}))
        for o in opts:
            o.step()
    return models, opts, pending


def _close(snap, model, opt=None, what=""):
    """A snapshot's parameters (and momentum, given the reference optimizer) against a model."""
    for i, (got, buf, p) in enumerate(zip(snap["params"], snap["momentum"], model.parameters())):
        torch.testing.assert_close(got.double(), p.detach(), **TOL, msg=lambda m: f"{what}, param {i}: {m}")
        if opt is not None:
            torch.testing.assert_close(buf.double(), opt.state[p]["momentum_buffer"], **TOL,
                                       msg=lambda m: f"{what}, momentum {i}: {m}")


def check_elastic_run(out: Path, steps: int, interval: int, stream=None, outer=None):
    """Every (re)start of the job, and its end, against the float64 reference.

    The workers of one (re)start hold the same step and world size. A (re)start's values must be
    those the reference reaches from the previous (re)start: after a sync every worker holds what
    the new rank 0 held at its last commit (its reference model under its old rank); the final
    models are the average of the last phase's reference models (finalize()). Returns the
    (step, size) of each (re)start. ``stream``: (fragments, delay) of a streaming run; the
    rounds in flight at each (re)start are held to the reference's too. ``outer``: the outer
    SGD's arguments of a run with outer=; theta0 and the outer momentum at each (re)start are
    held to the reference's, and the final models are the outer step from the last average."""
    refs = None

    def phase(starts, until):
        nonlocal refs
        if outer is not None:
            models, opts, refs = _outer_phase(starts, until, interval, outer)
            return models, opts, None
        if stream is None:
            return (*_phase(starts, until, interval), None)
        return _stream_phase(starts, until, interval, *stream)

    snaps = [torch.load(p, weights_only=False) for p in out.glob("start-*.pt")]
    snaps.sort(key=lambda d: (d["step"], d["pid"], d["host"]))
    groups = []
    for key, g in itertools.groupby(snaps, key=lambda d: (d["step"], d["size"])):
        latest = {(d["host"], d["pid"]): d for d in g}  # a worker restarted twice at one step
        groups.append(sorted(latest.values(), key=lambda d: d["rank"]))
    for g in groups:
        assert [d["rank"] for d in g] == list(range(g[0]["size"])), [(d["rank"], d["size"]) for d in g]
        assert all(d["local_step"] == d["step"] for d in g), "the counters follow the commit"
    init = _example_model()
    for d in groups[0]:
        _close(d, init, what="the first start")
        if outer is not None:  # theta0 = x^0, no outer momentum yet
            _close_outer(d, OuterReference([init], outer), "the first start")
    for prev, nxt in zip(groups, groups[1:]):
        models, opts, pending = phase(prev, nxt[0]["step"])
        old_rank = {(d["host"], d["pid"]): d["rank"] for d in prev}
        synced = all(all(torch.equal(a, b) for a, b in zip(d["params"], nxt[0]["params"])) for d in nxt)
        for d in nxt:
            src = nxt[0] if synced else d
            assert (src["host"], src["pid"]) in old_rank, \
                f"the worker whose state the restart at step {d['step']} took did not train before it"
            j = old_rank[(src["host"], src["pid"])]
            what = f"restart at step {d['step']}, size {d['size']}, rank {d['rank']} (old rank {j})"
            _close(d, models[j], opts[j], what=what)
            if outer is not None:  # theta0 and the outer momentum travel with the state
                _close_outer(d, refs[j], what)
            if pending is not None:  # the rounds in flight travel with the state
                got = sorted((e["merge_at"], k[1], c) for e in d["in_flight"]
                             for k, c in e["correction"].items())
                want = sorted((m, i, c) for m, corr in pending[j] for i, c in corr.items())
                assert [g[:2] for g in got] == [w[:2] for w in want], f"{what}: rounds in flight"
                for (m, i, c), (_, _, w) in zip(got, want):
                    torch.testing.assert_close(c.double(), w, **TOL, msg=lambda e: f"{what}: {e}")
    if stream is not None:  # the point of the streaming run: a restart with rounds in flight
        assert any(d["in_flight"] for g in groups[1:] for d in g), "no restart had a round in flight"
    if outer is not None:  # the point of the outer run: a restart with outer momentum to carry
        moved = [max(float(st["momentum_buffer"].abs().max()) for st in d["outer"]["optimizer"]["state"].values())
                 for g in groups[1:] for d in g if d["outer"]["optimizer"]["state"]]
        assert moved and min(moved) > 1e-3, f"no restart carried a nonzero outer momentum: {moved}"
    last = groups[-1]
    models, _, pending = phase(last, steps)
    with torch.no_grad():
        for m, in_flight in zip(models, pending or []):  # finalize() merges what is in flight
            ps = list(m.parameters())
            for _, corr in in_flight:
                for i, c in corr.items():
                    ps[i].add_(c)
        mean = [torch.stack(ps).mean(0) for ps in zip(*(m.parameters() for m in models))]
        if outer is not None:  # finalize()'s round is an outer round: the final model is theta0
            for ps, avg in zip(zip(*(m.parameters() for m in models)), mean):
                for p in ps:
                    p.copy_(avg)
            for m, ref in zip(models, refs):
                ref.outer_round([m])
            mean = [torch.stack(ps).mean(0) for ps in zip(*(m.parameters() for m in models))]
    finals = [torch.load(p, weights_only=False) for p in sorted(out.glob("rank*.pt"))]
    assert len(finals) == last[0]["size"]
    for f in finals:
        for i, (got, want) in enumerate(zip(f["params"], mean)):
            torch.testing.assert_close(got.double(), want, **TOL, msg=lambda m: f"final rank {f['rank']}, param {i}: {m}")
    return [(g[0]["step"], g[0]["size"]) for g in groups]


# "torch": Horovod's own hvd.elastic.TorchState, as Horovod's elastic examples use it.
# "stream": streaming rounds (fragments=2, delay=3 at interval 4: the commit after each merge
# has the next fragment's round in flight, so the grow happens with a round in flight).
# "outer": outer= Nesterov SGD (OUTER); the joining worker receives rank 0's theta0 and outer
# momentum, and every phase is held to the float64 reference started from them.
@pytest.mark.parametrize("state", ["localsgd", "torch", "stream", "outer"])
def test_job_grows_and_every_worker_follows_rank0s_model_and_schedule(state):
    tmp = Path(tempfile.mkdtemp(prefix="prsgd_elastic_"))
    slots, record = tmp / "slots", tmp / "record"
    out = tmp / "out"
    out.mkdir()
    slots.write_text("2")
    env = dict(os.environ, PRSGD_SLOTS_FILE=str(slots), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cmd = ["horovodrun", "--network-interface", "lo", "-np", "2", "--min-np", "1", "--max-np", "3",
           "--host-discovery-script", str(REPO / "examples" / "discover_hosts.sh"),
           sys.executable, str(REPO / "examples" / "elastic.py"), "--steps", "300",
           "--step-ms", "20", "--record", str(record), "--out", str(out),
           *{"stream": ["--state", "localsgd", "--fragments", "2", "--delay", "3"],
             "outer": ["--state", "localsgd", "--outer-lr", str(OUTER["lr"]),
                       "--outer-momentum", str(OUTER["momentum"])]}.get(state, ["--state", state])]
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (not record.exists() or
                                               len(record.read_text().splitlines()) < 5):
            time.sleep(0.5)
        slots.write_text("3")  # a worker joins
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"elastic job did not finish:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    rows = [tuple(map(int, line.split())) for line in record.read_text().splitlines()]
    sizes = [size for size, _, _ in rows]
    assert sizes[0] == 2 and sizes[-1] == 3 and sorted(sizes) == sizes, sizes
    steps = [step for _, step, _ in rows]
    assert steps == sorted(steps), "the schedule resumed from the last commit, never went back"
    assert "done: 300 steps" in output and "final size 3" in output
    assert "counters agree: True" in output, output[-4000:]
    restarts = check_elastic_run(out, 300, 4, stream=(2, 3) if state == "stream" else None,
                                 outer=OUTER if state == "outer" else None)
    assert [size for _, size in restarts] == [2, 3], restarts
