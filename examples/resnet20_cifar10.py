"""ResNet-20 on CIFAR-10 with PR-SGD: the experiment of Yu, Yang, Zhu (AAAI 2019), section 5.

    # the paper's setting: 8 workers, batch 32 each, momentum 0.9, 300 epochs, average every 4 steps
    horovodrun -np 8 python examples/resnet20_cifar10.py --data-dir ~/data --interval 4
    # the same job with Horovod's synchronous optimizer (allreduce of gradients at every step)
    horovodrun -np 8 python examples/resnet20_cifar10.py --data-dir ~/data --baseline
    # no dataset on this machine: generated images of the same shape (checks the plumbing only)
    horovodrun -np 2 -H localhost:2 --gloo python examples/resnet20_cifar10.py --synthetic --max-steps 50

``--data-dir ROOT`` expects ``ROOT/cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5`` and
``test_batch``, the python-format pickles that torchvision also reads); nothing is downloaded.
Each rank trains on its own shard (every N-th image), per-worker batch 32, random crop (pad 4)
and horizontal flip done in torch. The learning rate is 0.1, 0.01 from epoch 150 and 0.001 from
epoch 225 (the paper's), driven by ``torch.optim.lr_scheduler.MultiStepLR``.

Schedules (``--schedule``): ``fixed`` averages every ``--interval`` steps (Algorithm 1);
``time-varying`` averages after epochs of K^s = round(interval * s^(1/3)) steps that grow as
Algorithm 2's do (the learning rate stays with MultiStepLR); ``heterogeneous`` lets every rank
pick its own number of local steps per round from its measured speed (Algorithm 3,
``Heterogeneous.by_speed``); an epoch then ends after as many rounds as ``fixed`` would make.

Rank 0 prints a progress line, appends to ``--csv`` (CSV: kind, epoch, step, train_loss, test_loss,
test_accuracy, lr, rounds, wall_s) and every rank writes ``--checkpoint DIR/rank{r}.pt`` (model, optimizer
state including the local-SGD counters, position in the data) at the end of every epoch and
when ``--max-steps`` stops the run; ``--resume`` continues from it. The run ends with
``finalize()`` (every rank holds the average) and the test accuracy of the averaged model.
"""
import argparse
import contextlib
import csv
import math
import os
import pickle
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import prsgd_hvd as hvd

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


# ---- ResNet-20 (He et al. 2016, the CIFAR variant: 3 stages of 3 basic blocks, 16/32/64 channels)
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = stride != 1 or cin != cout   # option A: subsample + zero-pad channels

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.down:
            short = x[:, :, ::2, ::2]
            pad = out.shape[1] - short.shape[1]
            short = F.pad(short, (0, 0, 0, 0, pad // 2, pad - pad // 2))
        return F.relu(out + short)


class ResNet20(nn.Module):
    def __init__(self, num_classes=10, blocks=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in [(16, 1), (32, 2), (64, 2)]:
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ---- data ----------------------------------------------------------------------------------
def load_cifar10(root):
    """(train_x uint8 [50000,3,32,32], train_y int64, test_x, test_y) from the python pickles."""
    folder = os.path.join(root, "cifar-10-batches-py")

    def read(name):
        with open(os.path.join(folder, name), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return torch.from_numpy(x.copy()), torch.tensor(d[b"labels"], dtype=torch.int64)

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = read("test_batch")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), test_x, test_y


def synthetic_cifar10(n_train=50000, n_test=10000):
    """Images of CIFAR-10's shape whose class shows in a colour offset: learnable, no download."""
    g = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, 256, (10, 3, 1, 1), generator=g).float()

    def make(n):
        y = torch.randint(0, 10, (n,), generator=g)
        x = (torch.randn(n, 3, 32, 32, generator=g) * 50 + offsets[y]).clamp(0, 255)
        return x.to(torch.uint8), y

    return (*make(n_train), *make(n_test))


def augment(x_uint8, gen):
    """Random crop with 4 pixels of padding and a random horizontal flip, then normalise."""
    x = x_uint8.float().div_(255)
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (n,), generator=gen)
    j = torch.randint(0, 9, (n,), generator=gen)
    rows = (i.view(n, 1) + torch.arange(32)).view(n, 1, 32, 1).expand(n, 3, 32, 40)
    x = padded.gather(2, rows)
    cols = (j.view(n, 1) + torch.arange(32)).view(n, 1, 1, 32).expand(n, 3, 32, 32)
    x = x.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    x[flip] = x[flip].flip(3)
    return (x - MEAN) / STD


def normalise(x_uint8):
    return (x_uint8.float().div(255) - MEAN) / STD


# ---- helpers ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, test_x, test_y, device, batch=500):
    """Accuracy and loss of ``model`` on the test set, each rank scoring its share (collective)."""
    model.eval()
    correct = loss = 0.0
    idx = torch.arange(hvd.rank(), len(test_y), hvd.size())
    for k in range(0, len(idx), batch):
        sel = idx[k:k + batch]
        out = model(normalise(test_x[sel]).to(device))
        y = test_y[sel].to(device)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
    model.train()
    tot = hvd.allreduce(torch.tensor([correct, loss, float(len(idx))], dtype=torch.float64),
                        op=hvd.Sum, name="eval.totals")
    return (tot[0] / tot[2]).item(), (tot[1] / tot[2]).item()


@torch.no_grad()
def averaged_copy(model, eval_model):
    """Load the rank average of ``model`` into ``eval_model`` without touching ``model`` (one
    allreduce; used to score the averaged model mid-training, as the paper's curves do)."""
    sd = model.state_dict()
    keys = [k for k, v in sd.items() if v.is_floating_point()]
    flat = torch.cat([sd[k].reshape(-1).float() for k in keys])
    flat = hvd.allreduce(flat, op=hvd.Average, name="eval.average")
    out, offset = {}, 0
    for k, v in sd.items():
        if v.is_floating_point():
            out[k] = flat[offset:offset + v.numel()].view_as(v).to(v.dtype)
            offset += v.numel()
        else:
            out[k] = v
    eval_model.load_state_dict(out)
    return eval_model


def progress(epoch, epochs, i, n, loss, rounds, start):
    width = 24
    done = int(width * i / max(n, 1))
    print(f"epoch {epoch + 1}/{epochs} [{'#' * done}{'.' * (width - done)}] {i}/{n} "
          f"loss {loss:.3f} rounds {rounds} {time.perf_counter() - start:.1f}s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", help="folder holding cifar-10-batches-py/")
    src.add_argument("--synthetic", action="store_true", help="generated data of CIFAR-10's shape")
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop after this many steps per rank (heterogeneous: after "
                         "max_steps/interval rounds)")
    ap.add_argument("--batch", type=int, default=32, help="per worker")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--milestones", type=int, nargs=2, default=[150, 225], help="epochs of lr/10")
    ap.add_argument("--interval", type=int, default=4, help="local steps between averages (I)")
    ap.add_argument("--schedule", choices=["fixed", "time-varying", "heterogeneous"], default="fixed")
    ap.add_argument("--baseline", action="store_true", help="hvd.DistributedOptimizer instead")
    ap.add_argument("--synthetic-size", type=int, nargs=2, default=[50000, 10000],
                    metavar=("TRAIN", "TEST"))
    ap.add_argument("--csv", default="resnet20_log.csv", help="CSV log (rank 0)")
    ap.add_argument("--checkpoint", default="resnet20_ckpt", help="folder; one file per rank")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--print-every", type=int, default=50, help="steps between progress lines")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    device = torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())
        device = torch.device("cuda", hvd.local_rank())
    else:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    if args.synthetic:
        train_x, train_y, test_x, test_y = synthetic_cifar10(*args.synthetic_size)
    else:
        train_x, train_y, test_x, test_y = load_cifar10(args.data_dir)
    shard = torch.arange(rank, len(train_y), size)           # each rank its own shard
    steps_per_epoch = (len(train_y) // size) // args.batch   # the same on every rank
    if steps_per_epoch < 1:
        sys.exit(f"{len(train_y)} training images are too few for {size} ranks x batch {args.batch}")

    torch.manual_seed(args.seed)
    model = ResNet20().to(device)
    eval_model = ResNet20().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    if args.baseline:
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        name = "hvd.DistributedOptimizer"
    else:
        if args.schedule == "fixed":
            schedule = hvd.FixedInterval(args.interval)
        elif args.schedule == "time-varying":
            schedule = hvd.TimeVarying(lambda s: max(1, round(args.interval * s ** (1 / 3))))
        else:
            schedule = hvd.Heterogeneous.by_speed(args.interval)
        opt = hvd.DistributedLocalSGD(opt, interval=schedule, model=model,
                                      named_parameters=model.named_parameters())
        name = f"DistributedLocalSGD({args.schedule}, I={args.interval})"
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=args.milestones, gamma=0.1)

    ckpt_path = os.path.join(args.checkpoint, f"rank{rank}.pt")
    epoch, step_in_epoch, total_steps, wall_before = 0, 0, 0, 0.0
    if args.resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck["world_size"] != size:
            sys.exit(f"checkpoint was written by {ck['world_size']} ranks, this job has {size}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["lr_scheduler"])
        epoch, step_in_epoch = ck["epoch"], ck["step_in_epoch"]
        total_steps, wall_before = ck["total_steps"], ck["wall_s"]
    else:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(opt, root_rank=0)

    def save_checkpoint():
        os.makedirs(args.checkpoint, exist_ok=True)
        # Under local SGD this is this rank's own model, on purpose: saved without the warning.
        per_rank = contextlib.nullcontext() if args.baseline else opt.per_rank_checkpoint()
        with per_rank:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "lr_scheduler": sched.state_dict(), "epoch": epoch,
                        "step_in_epoch": step_in_epoch, "total_steps": total_steps,
                        "wall_s": wall_before + time.perf_counter() - start,
                        "world_size": size, "args": vars(args)}, ckpt_path)

    log = None
    if rank == 0:
        new = not (args.resume and os.path.exists(args.csv))
        log = open(args.csv, "a" if not new else "w", newline="")
        writer = csv.writer(log)
        if new:
            writer.writerow(["kind", "epoch", "step", "train_loss", "test_loss", "test_accuracy",
                             "lr", "rounds", "wall_s"])
        print(f"{name}: {size} ranks, {steps_per_epoch} steps of batch {args.batch} per epoch and "
              f"rank, {len(test_y)} test images, device {device}", flush=True)

    def rounds():
        return total_steps if args.baseline else opt.rounds

    def write(kind, train_loss, test_loss=None, acc=None):
        if log is not None:
            writer.writerow([kind, epoch, total_steps,
                             "" if train_loss is None else f"{train_loss:.5f}",
                             "" if test_loss is None else f"{test_loss:.5f}",
                             "" if acc is None else f"{acc:.4f}", opt.param_groups[0]["lr"], rounds(),
                             f"{wall_before + time.perf_counter() - start:.2f}"])
            log.flush()

    loss_fn = nn.CrossEntropyLoss()
    heterogeneous = not args.baseline and args.schedule == "heterogeneous"
    rounds_per_epoch = max(1, steps_per_epoch // args.interval)
    start = time.perf_counter()
    stopped = False
    while epoch < args.epochs and not stopped:
        gen = torch.Generator().manual_seed(args.seed * 100003 + epoch * 101 + rank)
        order = shard[torch.randperm(len(shard), generator=gen)]
        running, count, i = 0.0, 0, step_in_epoch
        epoch_rounds_end = (epoch + 1) * rounds_per_epoch   # heterogeneous: the epoch in rounds
        while True:
            if heterogeneous:   # every rank stops after the same round, whatever its step count
                if opt.rounds >= epoch_rounds_end:
                    break
            elif i >= steps_per_epoch:
                break
            k = i % steps_per_epoch      # heterogeneous ranks may pass the end of their shard
            sel = order[k * args.batch:(k + 1) * args.batch]
            x = augment(train_x[sel], gen).to(device, non_blocking=True)
            y = train_y[sel].to(device, non_blocking=True)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            i, total_steps = i + 1, total_steps + 1
            step_in_epoch = i
            running, count = running + loss.item(), count + 1
            if rank == 0 and (i % args.print_every == 0 or i == steps_per_epoch):
                progress(epoch, args.epochs, min(i, steps_per_epoch), steps_per_epoch,
                         running / count, rounds(), start)
            if args.max_steps is not None and (
                    opt.rounds >= max(1, args.max_steps // args.interval) if heterogeneous
                    else total_steps >= args.max_steps):
                stopped = True   # heterogeneous: ranks take different step counts, so every
                break            # rank stops after the same round instead
        train_loss = running / max(count, 1)
        if stopped:
            write("train", train_loss)
            break
        # End of an epoch: score the average of the ranks' models (the model PR-SGD outputs).
        m = model if args.baseline else averaged_copy(model, eval_model)
        acc, test_loss = evaluate(m, test_x, test_y, device)
        write("epoch", train_loss, test_loss, acc)
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {train_loss:.4f}, test accuracy of the averaged "
                  f"model {acc:.4f}, rounds {rounds()}", flush=True)
        epoch, step_in_epoch = epoch + 1, 0
        sched.step()
        save_checkpoint()

    if stopped:
        save_checkpoint()            # mid-epoch: each rank keeps its own (different) model
    if not args.baseline:
        opt.finalize()               # collective: every rank now holds the averaged model
    acc, test_loss = evaluate(model, test_x, test_y, device)
    write("final", None, test_loss, acc)
    if rank == 0:
        s = "" if args.baseline else f", {opt.stats()['bytes_sent'] / 2**20:.1f} MiB sent per rank"
        print(f"final: test accuracy {acc:.4f}, test loss {test_loss:.4f}, {total_steps} steps, "
              f"{rounds()} rounds{s}, {wall_before + time.perf_counter() - start:.1f} s", flush=True)
        log.close()


if __name__ == "__main__":
    main()
