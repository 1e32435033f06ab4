"""Float64 simulation of all ranks for the mixed-dtype model (workers.common.MixedNet).

Plain torch, none of prsgd_hvd's code, like tests/reference.py; what it adds is a model of where
the package's numbers are stored, so that 16-bit parameters can be held to within an ulp:

- every parameter, gradient and momentum buffer is rounded to the parameter's own dtype where
  it is stored: the gradient after backward; in a local step after each tensor operation of
  ``torch.optim.SGD`` (its single-tensor loop: ``grad + wd * param``, ``buf * momentum``,
  ``+ (1 - dampening) * grad``, ``param - lr * buf``, each a tensor of the param's dtype);
- an average is computed in float32 (the package sums fp16/bf16 tensors in fp32 buffers) and
  rounded once to the parameter's dtype; the fused average+SGD pass (SGD with the kernels, a
  round before the update) computes the update from the float32 average in float32 and rounds
  the new parameter and momentum buffer once each;
- 16-bit compression follows the wire format of README/docs (prsgd_hvd/compression.py's module
  docstring): each rank sends Q(weight * (x_i - anchor + residual_i)), the residual keeping what
  Q lost (error feedback), the first round in full precision, the average
  anchor + sum / sum(weights) in float32 becoming the next anchor. fp16 deltas are summed by
  Horovod in fp16 (modelled exactly for 2 ranks: one rounding of the exact sum); bf16 deltas
  are gathered and summed in float32 in rank order.

Algorithm 1 (interval, warm-up) and Algorithm 3 (Heterogeneous intervals, uniform or "steps"
weights, optional finalize) are covered; each rank runs ``steps_for_rank`` steps.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch

from workers.common import make_mixed_model, mixed_loss_fn, steps_for_rank

WIRE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a tensor of ``dtype`` holds it (float64 again)."""
    return t.to(dtype).to(torch.float64)


def f32(t: torch.Tensor) -> torch.Tensor:
    return stored(t, torch.float32)


class _Rank:
    def __init__(self, spec: dict, base: torch.nn.Module, dtypes: List[torch.dtype]):
        self.model = copy.deepcopy(base)
        self.params = list(self.model.parameters())
        self.dtypes = dtypes
        hyper = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                 **spec.get("opt_kwargs", {})}
        if spec["opt"] != "sgd" or hyper.get("nesterov") or hyper.get("maximize"):
            raise NotImplementedError("the mixed model runs plain/momentum SGD")
        self.lr, self.momentum = hyper["lr"], hyper["momentum"]
        self.dampening, self.weight_decay = hyper["dampening"], hyper["weight_decay"]
        self.bufs: List[Optional[torch.Tensor]] = [None] * len(self.params)
        self.residual: Optional[List[torch.Tensor]] = None

    def gradients(self, spec: dict, r: int, t: int) -> None:
        for p in self.params:
            p.grad = None
        mixed_loss_fn(self.model, spec["seed"], r, t, dtype=torch.float64).backward()
        for p, dt in zip(self.params, self.dtypes):
            if p.grad is not None:
                p.grad.copy_(stored(p.grad, dt))

    @torch.no_grad()
    def update(self, averages: Optional[List[torch.Tensor]] = None) -> None:
        """One SGD step; with ``averages``, the fused pass from those float32 averages."""
        for i, (p, dt) in enumerate(zip(self.params, self.dtypes)):
            x = p.detach() if averages is None else averages[i]
            if p.grad is None:  # no local update; the fused pass still writes the average
                p.copy_(stored(x, dt))
                continue
            # torch.optim.SGD rounds each operation to the parameter's dtype; the fused kernel
            # works in float32 and rounds what it stores.
            r = (lambda v: stored(v, dt)) if averages is None else f32
            d = p.grad
            if self.weight_decay != 0:
                d = r(d + self.weight_decay * x)
            if self.momentum != 0:
                buf = self.bufs[i]
                if buf is None:
                    b = d.clone()
                else:
                    b = r(r(buf * self.momentum) + (1 - self.dampening) * d)
                self.bufs[i] = stored(b, dt)
                d = b
            p.copy_(stored(x - self.lr * d, dt))

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).clone() for p in self.params])


class _Averaging:
    """Rounds over all ranks: exact (float32) or 16-bit deltas with or without error feedback."""

    def __init__(self, spec: dict, n: int, error_feedback: bool):
        self.kind = spec.get("compression")
        self.error_feedback = error_feedback
        self.n = n
        self.anchor: Optional[List[torch.Tensor]] = None

    def _wire_sum(self, wires: List[torch.Tensor]) -> torch.Tensor:
        if self.kind == "fp16":
            if self.n != 2:
                raise NotImplementedError("Horovod's fp16 sum over more than 2 ranks rounds in an "
                                          "order this model does not know")
            return stored(wires[0] + wires[1], torch.float16)
        total = wires[0]
        for w in wires[1:]:
            total = f32(total + w)
        return total

    @torch.no_grad()
    def average(self, ranks: List[_Rank], weights: List[float]) -> List[torch.Tensor]:
        """The round's average per parameter (float32 values); advances the codec state."""
        payloads = [[p.detach().clone() for p in rk.params] for rk in ranks]
        total = sum(weights)
        scale = float(f32(torch.tensor(1.0 / total)))
        if self.kind is None or self.anchor is None:
            avg = [f32(f32(sum(w * pl[i] for w, pl in zip(weights, payloads))) * scale)
                   for i in range(len(payloads[0]))]
        else:
            wire_dtype = WIRE[self.kind]
            sent, lost = [], []
            for rk, w, pl in zip(ranks, weights, payloads):
                deltas = [f32(x - a) for x, a in zip(pl, self.anchor)]
                if self.error_feedback and rk.residual is not None:
                    deltas = [f32(d + e) for d, e in zip(deltas, rk.residual)]
                if w != 1.0:
                    deltas = [f32(d * w) for d in deltas]
                wires = [stored(d, wire_dtype) for d in deltas]
                sent.append(wires)
                lost.append([f32(f32(d - q) / w) if w != 1.0 else f32(d - q)
                             for d, q in zip(deltas, wires)])
            avg = [f32(a + f32(self._wire_sum([s[i] for s in sent]) * scale))
                   for i, a in enumerate(self.anchor)]
            if self.error_feedback:
                for rk, e in zip(ranks, lost):
                    rk.residual = e
        if self.kind is not None:
            self.anchor = [a.clone() for a in avg]
        return avg


def _divergence(rank: _Rank, avg: List[torch.Tensor]) -> float:
    return float(sum(((p.detach() - a) ** 2).sum() for p, a in zip(rank.params, avg)))


@torch.no_grad()
def _write_back(ranks: List[_Rank], avg: List[torch.Tensor]) -> None:
    for rk in ranks:
        for p, a, dt in zip(rk.params, avg, rk.dtypes):
            p.copy_(stored(a, dt))


def simulate_mixed(spec: dict, n: int, fused: bool, error_feedback: Optional[bool] = None):
    """All ranks of ``spec`` (model "mixed", SGD) on ``n`` ranks; ``fused``: the rounds before an
    update take the fused average+SGD pass. ``error_feedback`` overrides the spec's (to model
    the other choice). Returns (per-rank [steps_r, n_params] float64
    trajectories, final parameters per rank, per-rank {step: ||x_r - avg||^2 at its round})."""
    if error_feedback is None:
        error_feedback = spec.get("error_feedback", True)
    base = make_mixed_model(spec["seed"])
    dtypes = [p.dtype for p in base.parameters()]
    base = base.double()
    ranks = [_Rank(spec, base, dtypes) for _ in range(n)]
    averaging = _Averaging(spec, n, error_feedback)
    traj: List[List[torch.Tensor]] = [[] for _ in range(n)]
    divergence: List[Dict[int, float]] = [dict() for _ in range(n)]

    def round_(weights, t_of_rank):
        avg = averaging.average(ranks, weights)
        for r, rk in enumerate(ranks):
            if t_of_rank[r] is not None:
                divergence[r][t_of_rank[r]] = _divergence(rk, avg)
        return avg

    sched = spec.get("schedule")
    if sched is None:  # Algorithm 1: x_i <- avg(x^{t-1}) before step t's update
        interval, warmup = spec["interval"], spec.get("warmup", 0)
        steps = [steps_for_rank(spec, r, n) for r in range(n)]
        if len(set(steps)) != 1:
            raise NotImplementedError("uneven data is covered by tests/reference.py")
        for t in range(1, steps[0] + 1):
            for r, rk in enumerate(ranks):
                rk.gradients(spec, r, t)
            avg = None
            if t <= warmup or t % interval == 0:
                avg = round_([1.0] * n, [t] * n)
                if not fused:
                    _write_back(ranks, avg)
                    avg = None
            for r, rk in enumerate(ranks):
                rk.update(avg)  # the fused pass steps from the float32 average itself
                traj[r].append(rk.flat())
    else:  # Algorithm 3: K_r local steps, then the (weighted) average ends the epoch
        assert sched["kind"] == "heterogeneous"
        t = [0] * n
        for _ in range(sched["epochs"]):
            lengths = sched["intervals"]
            for r, rk in enumerate(ranks):
                for _ in range(lengths[r]):
                    t[r] += 1
                    rk.gradients(spec, r, t[r])
                    rk.update()
                    traj[r].append(rk.flat())
            weights = [float(k) for k in lengths] if sched.get("weights") == "steps" else [1.0] * n
            _write_back(ranks, round_(weights, list(t)))
            for r, rk in enumerate(ranks):  # the average happens inside the epoch's last step()
                traj[r][-1] = rk.flat()
    if spec.get("finalize"):
        _write_back(ranks, round_([1.0] * n, [None] * n))
    return [torch.stack(tr) for tr in traj], [rk.flat() for rk in ranks], divergence
