"""Horovod's own optimizer tests (test/parallel/test_torch.py, v0.28.1), adapted to
DistributedLocalSGD, and the patterns Horovod scripts use, under real horovodrun.

Usage (under horovodrun, HOROVOD_DYNAMIC_PROCESS_SETS=1): compat_worker.py --out DIR
Every case runs on every rank and saves what it saw; tests/test_horovod_compat.py asserts.
Written with ``import horovod.torch as hvd; import prsgd_hvd`` -- the way a Horovod script
that swaps one line sees the package.
"""
import argparse
import copy
import inspect
import io
import itertools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import horovod.torch as hvd
import prsgd_hvd  # noqa: F401  (registers DistributedLocalSGD & co. on horovod.torch)

N, D_IN, H, D_OUT = 16, 20, 10, 10


def flat(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def gather(t, name):
    """Every rank's tensor, rank order (to compare models across ranks)."""
    return hvd.allgather_object(t.clone(), name=name)


def error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def torch_optimizers():
    classes = {c.__name__: c for c in torch.optim.Optimizer.__subclasses__()
               if c.__module__.startswith("torch.optim") and c not in (torch.optim.LBFGS,
                                                                       torch.optim.SparseAdam)}
    classes["AdamW"] = torch.optim.AdamW
    return sorted(classes.items())


def new_optimizer(cls, opt_params, model):
    p = {k: v for k, v in opt_params.items() if k in inspect.signature(cls.__init__).parameters}
    return cls(model.parameters(), **p)


def mlp():
    return nn.Sequential(nn.Linear(D_IN, H), nn.ReLU(), nn.Linear(H, D_OUT))


def data(rank, t=0):
    g = torch.Generator().manual_seed(1000 * rank + t)
    return torch.randn(N, D_IN, generator=g), torch.randn(N, D_OUT, generator=g)


# ---- test_broadcast_state: every torch optimizer, checkpoint on rank 0, broadcast ---------------

def broadcast_state():
    out = {}
    opt_params_list = [dict(lr=0.2, momentum=0.9, weight_decay=0.1, centered=True), dict(lr=0.2)]
    for (name, cls), opt_params in itertools.product(torch_optimizers(), opt_params_list):
        key = f"{name}{opt_params}"

        def create():
            torch.manual_seed(0)
            model = mlp()
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            opt = new_optimizer(cls, opt_params, model)
            return model, hvd.DistributedLocalSGD(opt, interval=2,
                                                  named_parameters=model.named_parameters())
        try:
            torch.manual_seed(0)
            new_optimizer(cls, opt_params, mlp())
        except Exception as exc:  # noqa: BLE001  (torch itself rejects this model)
            out[key] = {"skipped_by_torch": f"{type(exc).__name__}: {exc}"}
            continue
        model, opt = create()
        x, y = data(hvd.rank())
        for _ in range(3):  # 3 steps at interval 2: one round, then one local step
            opt.zero_grad()
            F.mse_loss(model(x), y, reduction="sum").backward()
            opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a mid-interval checkpoint warns: that is tested elsewhere
            ckpt = io.BytesIO()
            if hvd.rank() == 0:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt)
            root_model = gather(flat(model), f"bs.{key}.model")[0]
            root_state = hvd.broadcast_object(opt.state_dict()["state"], root_rank=0,
                                              name=f"bs.{key}.state")
        model, opt = create()  # fresh objects everywhere; rank 0 resumes from its checkpoint
        if hvd.rank() == 0:
            ckpt.seek(0)
            c = torch.load(ckpt, weights_only=False)
            model.load_state_dict(c["model"])
            opt.load_state_dict(c["optimizer"])
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        model_is_roots = bool(torch.equal(flat(model), root_model))
        state = opt.state_dict()["state"]
        same_state = set(state) == set(root_state) and all(
            set(state[i]) == set(root_state[i]) and all(
                torch.equal(torch.as_tensor(state[i][k]), torch.as_tensor(root_state[i][k]))
                for k in state[i]) for i in state)
        # One more step on every rank: step 4 averages (interval 2) only if the counters came along.
        x, y = data(hvd.rank(), 1)
        opt.zero_grad()
        F.mse_loss(model(x), y, reduction="sum").backward()
        opt.step()
        out[key] = {"model_is_roots": model_is_roots, "state_equal": same_state,
                    "local_step": opt.local_step, "rounds": opt.rounds, "final": flat(model)}
    return out


# ---- test_broadcast_state_options: rank 0's options win ----------------------------------------

def broadcast_state_options():
    params_0 = dict(lr=0.1, momentum=0.8, weight_decay=0.2, nesterov=True,
                    betas=(0.9, 0.999), etas=(0.8, 2.4), step_sizes=(1e-5, 100))
    params_1 = dict(lr=0.2, momentum=0.9, weight_decay=0.1, nesterov=False,
                    betas=(0.8, 0.9), etas=(0.25, 1.75), step_sizes=(1e-7, 5))
    out = {}
    for name, cls in torch_optimizers():
        params = params_0 if hvd.rank() == 0 else params_1
        try:
            torch.manual_seed(0)
            model = mlp()
            opt = new_optimizer(cls, params, model)
        except Exception as exc:  # noqa: BLE001
            out[name] = {"skipped_by_torch": f"{type(exc).__name__}: {exc}"}
            continue
        # Options differ per rank, which the agreement check does not look at (they are not part
        # of the collective sequence); broadcasting rank 0's is the user's job, as in Horovod.
        opt = hvd.DistributedLocalSGD(opt, interval=2, named_parameters=model.named_parameters())
        x, y = data(hvd.rank())
        opt.zero_grad()
        F.mse_loss(model(x), y, reduction="sum").backward()
        opt.step()
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        p0 = {k: v for k, v in params_0.items() if k in inspect.signature(cls.__init__).parameters}
        got = {k: opt.param_groups[0][k] for k in p0}
        opt.zero_grad()
        F.mse_loss(model(x), y, reduction="sum").backward()
        opt.step()  # the option types work with the ops (and step 2 averages)
        out[name] = {"expected": p0, "got": got, "rounds": opt.rounds}
    return out


# ---- test_broadcast_state_no_grad: an integer parameter in the optimizer -----------------------

class ModelNoGrad(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(a.int(), requires_grad=False)
        self.b = nn.Parameter(b)

    def forward(self, x):
        return torch.index_select(self.b, 0, self.a.long()) * x


def broadcast_state_no_grad():
    torch.manual_seed(hvd.rank())
    model = ModelNoGrad(torch.tensor([1.0, 3.0]), torch.rand(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-6, momentum=0.9, nesterov=True)
    opt = hvd.DistributedLocalSGD(opt, interval=2, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    out = {"a_grad_is_none": opt.param_groups[0]["params"][0].grad is None}
    grad = opt.param_groups[0]["params"][1].grad
    out["b_grad_equal"] = bool(torch.equal(grad, hvd.broadcast(grad, root_rank=0, name="nograd.g")))
    for t in range(1, 4):
        opt.zero_grad()
        (model(torch.full((2,), float(hvd.rank() + t))) ** 2).sum().backward()
        opt.step()
    opt.finalize()
    out["a"] = model.a.detach().clone()
    out["b"] = model.b.detach().clone()
    out["rounds"] = opt.rounds
    return out


# ---- test_force_allreduce: parameters some ranks never touch are averaged too -------------------

class ForceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, H)
        self.fc2 = nn.Linear(H, D_OUT)
        self.fc3 = nn.Linear(D_OUT, D_OUT)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x1 = self.fc2(x)
        return x1, self.fc3(F.relu(x1))


FORCE_OPTION_SETS = [dict(lr=0.2, momentum=0.9, weight_decay=0.1, centered=True), dict(lr=0.2)]


def force_allreduce():
    out = {}
    for (name, cls), opt_params in itertools.product(torch_optimizers(), FORCE_OPTION_SETS):
        key = f"{name}{opt_params}"
        torch.manual_seed(0)
        model = ForceNet()
        try:
            opt = new_optimizer(cls, opt_params, model)
        except Exception as exc:  # noqa: BLE001
            out[key] = {"skipped_by_torch": f"{type(exc).__name__}: {exc}"}
            continue
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = hvd.DistributedLocalSGD(opt, interval=1, named_parameters=model.named_parameters())
        x, y = data(hvd.rank())
        for _ in range(2):
            y1, y2 = model(x)
            loss = F.mse_loss(y1 if hvd.rank() == 0 else y2, y, reduction="sum")
            opt.zero_grad()
            loss.backward()
            opt.step()
        opt.finalize()
        fc3 = torch.cat([model.fc3.weight.detach().reshape(-1), model.fc3.bias.detach()])
        out[key] = {"all": flat(model), "fc3": fc3.double(), "rounds": opt.rounds}
    return out


# ---- names: test_duplicate_names, test_missing_named_parameters, no names -----------------------

def names():
    net1, net2 = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)
    out = {}
    opt = torch.optim.SGD(itertools.chain(net1.parameters(), net2.parameters()), lr=0.1)
    out["duplicate"] = error_of(lambda: hvd.DistributedLocalSGD(
        opt, interval=2, named_parameters=itertools.chain(net1.named_parameters(),
                                                          net2.named_parameters())))
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out["missing"] = error_of(lambda: hvd.DistributedLocalSGD(
        opt, interval=2, named_parameters=list(model.named_parameters())[:2]))
    out["positional_names"] = error_of(lambda: hvd.DistributedLocalSGD(
        opt, model.named_parameters()))
    # No names at all (test_no_named_parameters, test_optimizer_no_named_parameters): fine.
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters()}],
                          lr=0.001)
    out["unnamed"] = error_of(lambda: hvd.DistributedLocalSGD(opt, interval=2))
    return out


# ---- test_dynamic_requires_grad: a GAN-like pair of optimizers ----------------------------------

def dynamic_requires_grad():
    torch.manual_seed(0)
    gen, disc = nn.Conv2d(1, 10, 1), nn.Conv2d(10, 1, 1)
    hvd.broadcast_parameters(gen.state_dict(), root_rank=0)
    hvd.broadcast_parameters(disc.state_dict(), root_rank=0)
    inp = torch.rand([1, 1, 8, 8]) + hvd.rank()
    gen_opt = hvd.DistributedLocalSGD(torch.optim.SGD(gen.parameters(), lr=0.1), interval=3,
                                      named_parameters=gen.named_parameters())
    disc_opt = hvd.DistributedLocalSGD(torch.optim.SGD(disc.parameters(), lr=0.1), interval=3,
                                       named_parameters=disc.named_parameters())
    violations = 0

    def train_step(train_generator=False, train_discriminator=False):
        nonlocal violations
        for p in gen.parameters():
            p.requires_grad_(train_generator)
        for p in disc.parameters():
            p.requires_grad_(train_discriminator)
        gen_opt.zero_grad()
        disc_opt.zero_grad()
        disc(gen(inp)).sum().backward()
        for p in gen.parameters():
            violations += train_generator != (p.grad is not None and p.grad.max().is_nonzero())
        for p in disc.parameters():
            violations += train_discriminator != (p.grad is not None and p.grad.max().is_nonzero())
        if train_generator:
            gen_opt.step()
        if train_discriminator:
            disc_opt.step()

    for _ in range(10):
        train_step(train_generator=True)
        train_step(train_discriminator=True)
    gen_opt.finalize()
    disc_opt.finalize()
    return {"violations": violations, "gen": flat(gen), "disc": flat(disc),
            "rounds": (gen_opt.rounds, disc_opt.rounds)}


# ---- test_gradient_clipping and test_synchronize_step_warning -----------------------------------

def clipping_and_sync_warning():
    def setup():
        x = torch.ones(1, 1).requires_grad_()
        y = torch.ones(1, 1).requires_grad_()
        model = nn.Linear(1, 1)
        model.weight = nn.Parameter(torch.zeros(1, 1) + 0.5)
        model.bias = nn.Parameter(torch.zeros(1))
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), interval=2,
                                      named_parameters=model.named_parameters())
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        return model, opt

    out = {}
    model, opt = setup()
    opt.synchronize()
    prior = model.weight.grad.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    clipped = model.weight.grad.item()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        with opt.skip_synchronize():
            opt.step()
    out["clip"] = {"prior": prior, "clipped": clipped, "weight": model.weight.item(),
                   "local_step": opt.local_step,
                   "sync_warnings": [str(w.message) for w in ws if "skip_synchronize" in str(w.message)]}
    # A second step inside skip_synchronize() still averages on schedule (step 2 of interval 2).
    opt.zero_grad()
    F.mse_loss(model(torch.ones(1, 1)), torch.ones(1, 1)).backward()
    with opt.skip_synchronize():
        opt.step()
    out["clip"]["rounds_after_step2"] = opt.rounds
    model, opt = setup()
    opt.synchronize()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        opt.step()
        opt.zero_grad()
        F.mse_loss(model(torch.ones(1, 1)), torch.ones(1, 1)).backward()
        opt.step()  # no synchronize() before this one: no warning
    out["sync_warning"] = [str(w.message) for w in ws if "skip_synchronize" in str(w.message)]
    return out


# ---- test_sparse_embeddings -------------------------------------------------------------------

def sparse_embeddings():
    out = {}
    for sparse_as_dense, cls in itertools.product([False, True], [torch.optim.SparseAdam,
                                                                  torch.optim.SGD]):
        torch.manual_seed(0)
        model = nn.Embedding(10, 3, sparse=True)
        before = model.weight.detach().clone()
        inp = torch.LongTensor([[1, 2, 4, 5], [4, 3, 2, 9]]) if hvd.rank() == 0 else \
            torch.LongTensor([[1, 3, 4], [4, 7, 9]])
        opt = hvd.DistributedLocalSGD(cls(list(model.parameters()), lr=0.1), interval=2,
                                      sparse_as_dense=sparse_as_dense)
        for _ in range(3):
            loss = model(inp).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        opt.finalize()
        out[f"{cls.__name__}/sparse_as_dense={sparse_as_dense}"] = {
            "weight": model.weight.detach().clone(), "before": before, "rounds": opt.rounds,
            "grad_is_sparse": model.weight.grad.is_sparse}
    return out


# ---- test_optimizer_process_sets: a rank outside the set trains alone --------------------------

def process_sets():
    even = [r for r in range(hvd.size()) if r % 2 == 0]
    odd = [r for r in range(hvd.size()) if r % 2 == 1]
    even_set, odd_set = hvd.add_process_set(even), hvd.add_process_set(odd)
    torch.manual_seed(0)
    model = mlp()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    twin = copy.deepcopy(model)  # the same training with a plain torch optimizer
    plain = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                  interval=2, named_parameters=model.named_parameters(),
                                  process_set=even_set)
    for t in range(4):
        x, y = data(hvd.rank(), t)
        for o, m in ((opt, model), (plain, twin)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
    opt.finalize()
    out = {"flat": flat(model), "equals_plain_torch": bool(torch.allclose(flat(model), flat(twin),
                                                                          rtol=0, atol=1e-6)),
           "world_size": opt.stats()["world_size"], "rounds": opt.rounds}
    # Errors that name the cause (issue: 'all' gave an AttributeError).
    out["string"] = error_of(lambda: hvd.DistributedLocalSGD(
        torch.optim.SGD(mlp().parameters(), lr=0.1), interval=2, process_set="all"))
    out["unregistered"] = error_of(lambda: hvd.DistributedLocalSGD(
        torch.optim.SGD(mlp().parameters(), lr=0.1), interval=2,
        process_set=hvd.ProcessSet([0, 1])))  # never registered (the sets are [0, 2] and [1])
    # The same ranks as a registered set: resolved to it.
    same = hvd.ProcessSet(even)
    torch.manual_seed(0)
    m2 = mlp()
    o2 = hvd.DistributedLocalSGD(torch.optim.SGD(m2.parameters(), lr=0.1), interval=2,
                                 process_set=same)
    o2.finalize()
    out["resolved_world_size"] = o2.stats()["world_size"]
    hvd.remove_process_set(odd_set)
    hvd.remove_process_set(even_set)
    return out


# ---- arguments: the whole DistributedOptimizer signature ----------------------------------------

def arguments():
    model = mlp()
    out = {}

    def wrap(**kw):
        return hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), interval=2, **kw)

    out["adasum"] = error_of(lambda: wrap(op=hvd.Adasum))
    out["sum"] = error_of(lambda: wrap(op=hvd.Sum))
    out["bpps0"] = error_of(lambda: wrap(backward_passes_per_step=0))
    out["predivide0"] = error_of(lambda: wrap(gradient_predivide_factor=0.0))
    out["groups_bad"] = error_of(lambda: wrap(groups=[[model[0].weight, model[0].weight]]))
    out["sparse_as_dense_bad"] = error_of(lambda: wrap(sparse_as_dense="yes"))
    out["compression_bad"] = error_of(lambda: wrap(compression=object()))
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        opt = wrap(named_parameters=model.named_parameters(), compression=hvd.Compression.none,
                   backward_passes_per_step=4, op=hvd.Average, gradient_predivide_factor=2.0,
                   num_groups=2, groups=None, sparse_as_dense=True,
                   process_set=hvd.global_process_set)
    out["full_signature"] = {"ok": opt.backward_passes_per_step == 4,
                             "num_groups_warning": any(issubclass(w.category, DeprecationWarning)
                                                       for w in ws)}
    out["bf16_reachable"] = hvd.Compression.bf16.__name__
    out["elastic_names"] = (hvd.elastic.LocalSGDState.__name__, hvd.elastic.TorchState.__name__)
    # Already wrapped, both orders (RecursionError / AttributeError before).
    out["hvd_then_local"] = error_of(lambda: hvd.DistributedLocalSGD(
        hvd.DistributedOptimizer(torch.optim.SGD(mlp().parameters(), lr=0.1)), interval=2))
    out["local_then_hvd"] = error_of(lambda: hvd.DistributedOptimizer(
        hvd.DistributedLocalSGD(torch.optim.SGD(mlp().parameters(), lr=0.1), interval=2)))
    # A complex parameter cannot be averaged: named at construction.
    cplx = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    out["complex"] = error_of(lambda: hvd.DistributedLocalSGD(
        torch.optim.SGD([cplx], lr=0.1), interval=2, named_parameters=[("phase", cplx)]))
    return out


# ---- AMP: synchronize(); scaler.unscale_(opt); with skip_synchronize(): scaler.step(opt) ------

def amp():
    """Horovod's mixed-precision loop (pytorch_mnist.py) against the same loop without a
    scaler: unscaled gradients, so the trajectories agree."""
    res = {}
    for use_scaler in (True, False):
        torch.manual_seed(0)
        model = mlp()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                      interval=2, named_parameters=model.named_parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if use_scaler else None
        for t in range(5):
            x, y = data(hvd.rank(), t)
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            if scaler:
                scaler.scale(loss).backward()
                opt.synchronize()
                scaler.unscale_(opt)
                with opt.skip_synchronize():
                    scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
        opt.finalize()
        res["scaler" if use_scaler else "plain"] = {"flat": flat(model), "rounds": opt.rounds}
    return res


# ---- an LR scheduler created before wrapping ---------------------------------------------------

def lr_scheduler_before_wrapping():
    res = {}
    for order in ("before", "after"):
        torch.manual_seed(0)
        model = mlp()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        if order == "before":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            opt = hvd.DistributedLocalSGD(opt, interval=3)
        else:
            opt = hvd.DistributedLocalSGD(opt, interval=3)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            for t in range(7):
                x, y = data(hvd.rank(), t)
                opt.zero_grad()
                F.mse_loss(model(x), y).backward()
                opt.step()
                sched.step()
        opt.finalize()
        res[order] = {"flat": flat(model), "rounds": opt.rounds, "local_step": opt.local_step,
                      "lr": opt.param_groups[0]["lr"],
                      "scheduler_warnings": [str(w.message) for w in ws
                                             if "lr_scheduler" in str(w.message)
                                             or "optimizer.step()" in str(w.message)]}
    return res


# ---- the standard resume (pytorch_imagenet_resnet50.py) ------------------------------------------

def resume():
    """Train 5 steps at interval 4, rank 0 checkpoints, everybody rebuilds, rank 0 loads,
    broadcast_parameters + broadcast_optimizer_state, 6 more steps: the same as 11 steps
    uninterrupted (the rounds at steps 8 fall where they would have)."""
    def build():
        torch.manual_seed(0)
        model = mlp()
        opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                      interval=4, named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        return model, opt

    def train(model, opt, steps):
        for t in steps:
            x, y = data(hvd.rank(), t)
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    model, opt = build()
    train(model, opt, range(11))
    straight_rounds = opt.rounds

    model, opt = build()
    train(model, opt, range(5))
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        if hvd.rank() == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    ckpt_warnings = [str(w.message) for w in ws]
    # The run's other ranks hold different models mid-interval; the resume starts all from rank 0's.
    model, opt = build()
    fresh_counters = (opt.local_step, opt.rounds)
    if hvd.rank() == 0:
        buf.seek(0)
        c = torch.load(buf, weights_only=False)
        model.load_state_dict(c["model"])
        opt.load_state_dict(c["optimizer"])
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    counters = (opt.local_step, opt.rounds)
    after_broadcast_is_roots = bool(torch.equal(flat(model), gather(flat(model), "resume.m")[0]))
    train(model, opt, range(5, 11))
    return {"fresh_counters": fresh_counters, "counters_after_broadcast": counters,
            "after_broadcast_is_roots": after_broadcast_is_roots, "rounds": opt.rounds,
            "straight_rounds": straight_rounds, "checkpoint_warnings": ckpt_warnings}


# ---- local steps no average has seen -------------------------------------------------------------

_left_unfinalized = []


def unaveraged_warning():
    torch.manual_seed(0)
    model = mlp()
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.05), interval=4)
    res = {}
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        opt.state_dict()  # no steps yet: nothing to warn about
        for t in range(3):
            x, y = data(hvd.rank(), t)
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        opt.state_dict()
        opt.state_dict()  # once per optimizer, not per checkpoint
        opt.finalize()
        res["after_finalize_is_quiet"] = True
        opt.state_dict()
    res["messages"] = [str(w.message) for w in ws
                       if issubclass(w.category, prsgd_hvd.horovod_compat.LocalStepsNotAveragedWarning)]
    # And one left un-finalized, for the warning at exit (checked in horovodrun's output).
    opt2 = hvd.DistributedLocalSGD(torch.optim.SGD(mlp().parameters(), lr=0.05), interval=4)
    x, y = data(hvd.rank(), 0)
    opt2.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt2.step()
    _left_unfinalized.append(opt2)
    return res


CASES = [broadcast_state, broadcast_state_options, broadcast_state_no_grad, force_allreduce, names,
         dynamic_requires_grad, clipping_and_sync_warning, sparse_embeddings, process_sets,
         arguments, amp, lr_scheduler_before_wrapping, resume, unaveraged_warning]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    results = {}
    only = os.environ.get("PRSGD_COMPAT_CASES")  # comma-separated case names, for debugging
    for case in CASES:
        if only is None or case.__name__ in only.split(","):
            results[case.__name__] = case()
    torch.save(results, f"{args.out}/rank{hvd.rank()}.pt")
    hvd.allreduce(torch.zeros(1), name="compat_worker.done")


if __name__ == "__main__":
    main()
