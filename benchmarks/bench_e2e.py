"""End-to-end training throughput: DistributedLocalSGD vs hvd.DistributedOptimizer vs PyTorch-style
periodic model averaging, measured in the same run.

    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/bench_e2e.py
    horovodrun -np 4 -H localhost:4 --gloo python benchmarks/bench_e2e.py --steps 8 16

Variants (each a fresh copy of the same model and the same SGD, lr 0.1 momentum 0.9):

* ``hvd.DistributedOptimizer``: Horovod's synchronous data parallelism, one (fused) gradient
  allreduce per step -- the baseline every ratio is taken against;
* ``DistributedLocalSGD(I)``: this package, I = 1, 4, 16 (one flat-buffer allreduce of the
  parameters every I steps, the average and the SGD update fused in one pass);
* ``torch-style(I)``: what ``torch.distributed.algorithms.model_averaging.PeriodicModelAverager``
  does, written with Horovod: a local ``optimizer.step()``, then every I steps ``torch.cat`` of
  all parameters, one ``hvd.allreduce`` (average) and a copy back into the parameters.

Models: ResNet-20 (from ``examples/resnet20_cifar10.py``, 0.27M parameters, CIFAR-shaped batch 32
per rank) and an MLP of ~6.3M parameters (batch 32 of 1024 features). Data are random tensors
(throughput only). Variants run interleaved, ``--repeats`` times, each for ``--steps`` steps after
``--warmup`` steps; steps/s is total steps over total time of the timed part (rank 0's clock;
every variant ends with a blocking collective, so all ranks agree). "Bytes/step" is the
payload handed to allreduce per step and rank (parameters or gradients, fp32, plus our two
control elements), not what the ring transport moves on the wire.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

import prsgd_hvd as hvd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from resnet20_cifar10 import ResNet20  # noqa: E402


def make_mlp():
    return nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                         nn.Linear(2048, 10))


MODELS = {
    "resnet20": (ResNet20, lambda g: torch.randn(32, 3, 32, 32, generator=g)),
    "mlp6m": (make_mlp, lambda g: torch.randn(32, 1024, generator=g)),
}


class TorchStyleAverager:
    """PeriodicModelAverager's path: cat all params, allreduce the flat copy, copy back."""

    def __init__(self, params, interval):
        self.params, self.interval, self.step, self.bytes_sent = list(params), interval, 0, 0

    @torch.no_grad()
    def average_parameters(self):
        self.step += 1
        if self.step % self.interval:
            return
        flat = torch.cat([p.reshape(-1) for p in self.params])
        flat = hvd.allreduce(flat, op=hvd.Average, name="torch_style.average")
        self.bytes_sent += flat.numel() * flat.element_size()
        offset = 0
        for p in self.params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def run_variant(model_name, variant, steps, warmup, init_state, local_kwargs):
    build, batch = MODELS[model_name]
    model = build()
    model.load_state_dict(init_state)
    g = torch.Generator().manual_seed(hvd.rank())
    x, y = batch(g), torch.randint(0, 10, (32,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kind, interval = variant
    averager = None
    if kind == "distopt":
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    elif kind == "local_sgd":
        opt = hvd.DistributedLocalSGD(opt, interval=interval, **local_kwargs,
                                      named_parameters=model.named_parameters())
    else:
        averager = TorchStyleAverager(model.parameters(), interval)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if averager is not None:
            averager.average_parameters()

    for _ in range(warmup):
        step()
    hvd.allreduce(torch.zeros(1), name="bench.sync")          # start together
    bytes0 = (opt.stats()["bytes_sent"] if kind == "local_sgd" else
              averager.bytes_sent if averager else 0)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    hvd.allreduce(torch.zeros(1), name="bench.sync")          # everyone's last step is done
    seconds = time.perf_counter() - start
    if kind == "local_sgd":
        sent = opt.stats()["bytes_sent"] - bytes0
    elif averager is not None:
        sent = averager.bytes_sent - bytes0
    else:
        sent = steps * sum(p.numel() * p.element_size() for p in model.parameters())
    if kind == "local_sgd":
        opt.finalize()   # outside the timing; completes the round overlap may have started
    return seconds, sent


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 32],
                    help="timed steps per variant and repeat, one value per model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--intervals", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    ap.add_argument("--nonfinite", default=None, choices=["raise", "exclude", "ignore"],
                    help="passed to DistributedLocalSGD (default: the package's default)")
    args = ap.parse_args()

    hvd.init()
    torch.set_num_threads(args.threads)
    variants = [("distopt", None)]
    variants += [("local_sgd", i) for i in args.intervals]
    variants += [("torch_style", i) for i in args.intervals]
    names = {("distopt", None): "hvd.DistributedOptimizer"}
    names.update({("local_sgd", i): f"DistributedLocalSGD(I={i})" for i in args.intervals})
    names.update({("torch_style", i): f"torch-style averaging(I={i})" for i in args.intervals})
    local_kwargs = {} if args.nonfinite is None else {"nonfinite": args.nonfinite}
    steps_for = dict(zip(args.models, args.steps + [args.steps[-1]] * len(args.models)))

    for model_name in args.models:
        torch.manual_seed(0)
        init_state = MODELS[model_name][0]().state_dict()
        n_params = sum(v.numel() for k, v in init_state.items()
                       if "running" not in k and "num_batches" not in k)
        steps = steps_for[model_name]
        totals = {v: [0.0, 0] for v in variants}
        for rep in range(args.repeats):
            for v in variants:       # interleaved, so drifting machine load hits every variant
                seconds, sent = run_variant(model_name, v, steps, args.warmup, init_state,
                                            local_kwargs)
                totals[v][0] += seconds
                totals[v][1] += sent
        if hvd.rank() == 0:
            base = totals[variants[0]]
            base_rate = args.repeats * steps / base[0]
            base_bytes = base[1] / (args.repeats * steps)
            print(f"\n{hvd.size()} ranks, {model_name} ({n_params:,} params), {steps} steps x "
                  f"{args.repeats} repeats per variant, {args.threads} thread(s) per rank"
                  + (f", DistributedLocalSGD(nonfinite={args.nonfinite!r})" if local_kwargs else ""))
            print(f"{'variant':<30} {'steps/s':>8} {'vs DistOpt':>10} {'MiB/step':>9} "
                  f"{'vs DistOpt':>10}")
            for v in variants:
                rate = args.repeats * steps / totals[v][0]
                per_step = totals[v][1] / (args.repeats * steps)
                print(f"{names[v]:<30} {rate:>8.2f} {rate / base_rate:>9.2f}x "
                      f"{per_step / 2**20:>9.3f} {per_step / base_bytes:>9.3f}x", flush=True)


if __name__ == "__main__":
    main()
