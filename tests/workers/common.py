"""Model, data and optimizer construction shared by the workers and the float64 reference.

Deliberately free of prsgd_hvd: the reference simulation must not reuse the code under test.
"""
from __future__ import annotations

import torch
from torch import nn

IN, HIDDEN, OUT, BATCH = 6, 5, 3, 8


class Net(nn.Module):
    """Small non-convex model with awkward parameter shapes and a rank-dependent branch.

    ``branch`` is used only on rank 0, so on other ranks its parameters get no gradient
    (``.grad is None``) -- they must still be averaged every round.
    """

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, OUT)
        self.gain = nn.Parameter(torch.tensor(1.0))        # 0-dim parameter
        self.branch = nn.Linear(OUT, OUT, bias=False)

    def forward(self, x, rank: int):
        h = torch.tanh(self.fc1(x))
        y = self.fc2(h) * self.gain
        if rank == 0:
            y = y + 0.1 * self.branch(y)
        return y


def make_model(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(seed: int, rank: int, t: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed * 100003 + rank * 1009 + t)
    x = torch.randn(BATCH, IN, generator=g)
    y = torch.randn(BATCH, OUT, generator=g)
    return x.to(dtype), y.to(dtype)


def loss_fn(model: Net, seed: int, rank: int, t: int, dtype=torch.float32, device=None):
    x, y = batch(seed, rank, t, dtype)  # drawn on the CPU: the same numbers on every device
    if device is not None:
        x, y = x.to(device), y.to(device)
    return ((model(x, rank) - y) ** 2).mean()


OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}


def make_optimizer(spec: dict, model: nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS[spec["opt"]](model.parameters(), **spec.get("opt_kwargs", {}))


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])


# Named callables for schedules (JSON scenarios cannot carry functions).
CALLABLES = {
    "grow": lambda s: 1 + s // 2,          # K^s = 1, 2, 2, 3, 3, ...
    "decay": lambda s: 0.1 / s,            # gamma^s
}


def _value_spec(v):
    return CALLABLES[v[3:]] if isinstance(v, str) and v.startswith("fn:") else v


def schedule_from_spec(sched: dict, hvd):
    """Build a prsgd_hvd schedule from a JSON-able dict (workers only)."""
    kind = sched["kind"]
    if kind == "time_varying":
        lrs = sched.get("lrs")
        return hvd.TimeVarying(_value_spec(sched["epoch_lengths"]),
                               None if lrs is None else _value_spec(lrs),
                               repeat_last=sched.get("repeat_last", False))
    if kind == "heterogeneous":
        return hvd.Heterogeneous(sched["intervals"], weights=sched.get("weights", "uniform"))
    if kind == "hierarchical":
        return hvd.Hierarchical({period: group for period, group in sched["levels"]})
    raise ValueError(kind)


def epoch_length(sched: dict, rank: int, s: int) -> int:
    if sched["kind"] == "heterogeneous":
        return sched["intervals"][rank]
    lengths = _value_spec(sched["epoch_lengths"])
    if callable(lengths):
        return lengths(s)
    return lengths[min(s, len(lengths)) - 1]


def epoch_lr(sched: dict, s: int):
    lrs = sched.get("lrs")
    if lrs is None:
        return None
    lrs = _value_spec(lrs)
    return lrs(s) if callable(lrs) else lrs[min(s, len(lrs)) - 1]


def steps_for_rank(spec: dict, rank: int, size: int) -> int:
    if "schedule" in spec and "epochs" in spec["schedule"]:
        return sum(epoch_length(spec["schedule"], rank, s)
                   for s in range(1, spec["schedule"]["epochs"] + 1))
    return spec["steps"] + rank * spec.get("extra_steps_per_rank", 0)


# ---- A model of three dtypes in one optimizer, for the kernels' edges across ranks ----------
# fp32, fp16 and bf16 parameters interleaved in registration order, so each (device, dtype)
# bucket of a round gathers tensors from all over the parameter list; odd sizes (vector tails)
# and two tensors longer than one 32768-element kernel chunk (csrc/segment_table.h kChunkSize,
# the CPU kernels' kGrainSize). The forward pass computes in the input's dtype (float32 in the
# workers, float64 in the reference): a 16-bit parameter's gradient is computed in that dtype
# and rounded once to the parameter's own, which the reference models exactly.
MIXED_BIG32 = (33, 1001)   # fp32, 33033 elements
MIXED_BIG16 = 32771        # bf16
MIXED_WIDE16 = 1007        # fp16


class MixedNet(nn.Module):
    """``branch`` (fp16) is used only on rank 0: elsewhere it has no gradient."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN, 7)                                      # fp32: 42 + 7
        self.mid = nn.Linear(7, 5).to(torch.float16)                     # fp16: 35 + 5
        self.out = nn.Linear(5, OUT).to(torch.bfloat16)                  # bf16: 15 + 3
        self.gain = nn.Parameter(torch.tensor(1.0, dtype=torch.float16))  # 0-dim fp16
        self.branch = nn.Parameter((0.3 * torch.randn(OUT, OUT)).to(torch.float16))
        self.wide = nn.Parameter((0.5 * torch.randn(MIXED_WIDE16)).to(torch.float16))
        self.big32 = nn.Parameter(0.5 * torch.randn(*MIXED_BIG32))
        self.big16 = nn.Parameter((0.5 * torch.randn(MIXED_BIG16)).to(torch.bfloat16))

    def forward(self, x, rank: int):
        dt = x.dtype
        h = torch.tanh(nn.functional.linear(x, self.fc1.weight.to(dt), self.fc1.bias.to(dt)))
        h = torch.tanh(nn.functional.linear(h, self.mid.weight.to(dt), self.mid.bias.to(dt)))
        y = nn.functional.linear(h, self.out.weight.to(dt), self.out.bias.to(dt)) * self.gain.to(dt)
        if rank == 0:
            y = y + 0.1 * nn.functional.linear(y, self.branch.to(dt))
        return y


def make_mixed_model(seed: int) -> MixedNet:
    torch.manual_seed(seed)
    return MixedNet()




def mixed_loss_fn(model: MixedNet, seed: int, rank: int, t: int, dtype=torch.float32, device=None):
    """Data loss of the small layers plus, for the long tensors, a per-element nonlinear pull
    toward targets drawn per (rank, step): their gradients differ between ranks element by
    element, so an average written to the wrong place or skipped shows."""
    x, y = batch(seed, rank, t, dtype)
    g = torch.Generator().manual_seed(seed * 7919 + rank * 131 + t)
    targets = [0.5 * torch.randn(n, generator=g) for n in
               (MIXED_BIG32[0] * MIXED_BIG32[1], MIXED_BIG16, MIXED_WIDE16)]
    if device is not None:
        x, y = x.to(device), y.to(device)
        targets = [tg.to(device) for tg in targets]
    loss = ((model(x, rank) - y) ** 2).mean()
    for p, tg in zip((model.big32, model.big16, model.wide), targets):
        loss = loss + ((torch.tanh(p.to(dtype).reshape(-1)) - tg.to(dtype)) ** 2).sum()
    return loss


def flat_params_f32(model: nn.Module) -> torch.Tensor:
    """All parameters as one float32 vector: exact for fp32/fp16/bf16, half the bytes of
    flat_params (the mixed model has ~66k parameters and is saved at every step)."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])
