"""Float64 reference of streaming rounds (``delay=tau``, ``fragments=F``), all ranks in one process.

Plain torch only, none of prsgd_hvd's code, from the docstring of ``DistributedLocalSGD``
(``delay``, ``fragments``) and README "Streaming rounds":

* a round made before the update of step t packs every rank's x_sent and computes the common
  point c (the mean, or with an outer optimizer the new theta0 after the outer step from the
  mean); rank r merges it before the update of step t+tau: x_r <- x_r + (c - x_sent_r);
  an epoch that ends after step t's update (Algorithms 2, 3) is "before the update of t+1";
* fragment p (whole tensors, in order; a tensor whose middle byte lies past the share
  total*(p+1)/F of the fragment being filled opens the next one, and each fragment still to
  fill keeps at least one tensor) is averaged
  before the update of the steps t with (t - p*I/F) mod I == 0; warm-up rounds average every
  fragment at once, without delay;
* a rank that has run out of steps merges what it has in flight at once and then answers every
  round with its current model, taking c at once; finalize() ends with one round of every
  fragment over the final models.
"""
from __future__ import annotations

import torch

from reference import _local_step, _start
from reference_outer import OuterReference
from workers.common import epoch_length, epoch_lr, flat_params, steps_for_rank


def fragment_split(params, F):
    """Indices of the parameters in each of F fragments (the rule in the module doc)."""
    sizes = [p.numel() * 4 for p in params]  # the workers' model is float32
    total = sum(sizes)
    out, done, k = [[] for _ in range(F)], 0, 0
    for i, size in enumerate(sizes):
        past_share = done + size / 2 > total * (k + 1) / F
        if out[k] and k < F - 1 and (past_share or len(params) - i <= F - 1 - k):
            k += 1
        out[k].append(i)
        done += size
    return out


class _Job:
    def __init__(self, spec, n):
        self.spec, self.n = spec, n
        self.models, self.opts = _start(spec, n)
        self.params = [list(m.parameters()) for m in self.models]
        self.outer = OuterReference(self.models, spec["outer"]) if spec.get("outer") else None
        self.pending = [[] for _ in range(n)]  # per rank: [merge_at, {index: c - x_sent}]

    @torch.no_grad()
    def common_point(self, indices, contributions, weights=None, warmup=False):
        """c for the tensors ``indices`` from each rank's x_sent (weighted mean, then the
        outer step on those tensors only)."""
        w = torch.ones(self.n, dtype=torch.float64) if weights is None else \
            torch.tensor(weights, dtype=torch.float64)
        mean = {i: sum(w[r] * contributions[r][i] for r in range(self.n)) / w.sum()
                for i in indices}
        if self.outer is None:
            return mean
        theta = self.outer.theta
        if warmup:
            for i in indices:
                theta[i].copy_(mean[i])
            return mean
        for i in indices:
            theta[i].grad = theta[i] - mean[i]
        self.outer.opt.step()
        for th in theta:
            th.grad = None
        return {i: theta[i].clone() for i in indices}

    @torch.no_grad()
    def round(self, indices, t_merge, finished, weights=None, immediate=False, warmup=False):
        """A round over ``indices``; training ranks merge before the update of ``t_merge``
        (or at once), finished ranks take c at once."""
        sent = [{i: self.params[r][i].detach().clone() for i in indices} for r in range(self.n)]
        c = self.common_point(indices, sent, weights, warmup)
        for r in range(self.n):
            if immediate or finished[r]:
                for i in indices:
                    self.params[r][i].copy_(c[i])
            else:
                self.pending[r].append([t_merge, {i: c[i] - sent[r][i] for i in indices}])

    @torch.no_grad()
    def merge_due(self, r, t=None):
        """Merge rank r's rounds due before the update of step t (all of them: t=None)."""
        keep = []
        for merge_at, corrections in self.pending[r]:
            if t is None or merge_at <= t:
                for i, corr in corrections.items():
                    self.params[r][i].add_(corr)
            else:
                keep.append([merge_at, corrections])
        self.pending[r] = keep

    def finish(self):
        for r in range(self.n):
            self.merge_due(r)
        everything = list(range(len(self.params[0])))
        self.round(everything, None, [True] * self.n)


def simulate_streaming(spec: dict, n: int):
    """Algorithm 1 (``interval``, ``warmup``, uneven ``steps``) with ``delay`` and
    ``fragments``. Returns (per-rank trajectories, final parameters per rank, None)."""
    job = _Job(spec, n)
    I, tau, F, W = spec["interval"], spec.get("delay", 0), spec.get("fragments", 1), spec.get("warmup", 0)
    split = fragment_split(job.params[0], F)
    steps = [steps_for_rank(spec, r, n) for r in range(n)]
    traj = [[] for _ in range(n)]
    for t in range(1, max(steps) + 1):
        active = [t <= steps[r] for r in range(n)]
        for r in range(n):
            if active[r]:
                _local_step(spec, r, t, job.models[r], job.opts[r])  # the gradient at x^{t-1}
                job.merge_due(r, t)
        if t <= W:
            for frag in split:
                job.round(frag, t, [not a for a in active], immediate=True, warmup=True)
        elif t % (I // F) == 0:
            frag = split[(t // (I // F)) % F]
            job.round(frag, t + tau, [not a for a in active], immediate=(tau == 0))
        for r in range(n):
            if active[r]:
                job.opts[r].step()
                traj[r].append(flat_params(job.models[r]))
                if t == steps[r] and spec.get("finalize"):  # finalize() merges what is in flight
                    job.merge_due(r)
    if spec.get("finalize"):
        job.finish()
    return [torch.stack(tr) for tr in traj], [flat_params(m) for m in job.models], None


def simulate_streaming_epochs(spec: dict, n: int):
    """Algorithms 2 and 3 with ``delay`` and ``fragments``: rank r's epoch s runs its K_r^s steps
    at gamma^s; fragment p (p = 1, ..., F-1) is averaged after the update of the epoch's
    (p*K_r/F)-th step on each rank r, fragment 0 after its last step, each with the epoch's
    weights; a round after the update of step t merges before the update of step t + 1 + tau
    (tau = 0: at once, as Algorithm 2 averages)."""
    job = _Job(spec, n)
    sched, tau, F = spec["schedule"], spec.get("delay", 0), spec.get("fragments", 1)
    split = fragment_split(job.params[0], F)
    t = [0] * n
    traj = [[] for _ in range(n)]
    for s in range(1, sched["epochs"] + 1):
        lengths = [epoch_length(sched, r, s) for r in range(n)]
        lr = epoch_lr(sched, s)
        start = list(t)
        for r in range(n):
            if lr is not None:
                for g in job.opts[r].param_groups:
                    g["lr"] = lr
        for j in range(1, F + 1):  # the epoch's rounds: fragments 1, ..., F-1, then 0
            for r in range(n):
                while t[r] < start[r] + j * lengths[r] // F:
                    t[r] += 1
                    _local_step(spec, r, t[r], job.models[r], job.opts[r])
                    job.merge_due(r, t[r])
                    job.opts[r].step()
                    traj[r].append(flat_params(job.models[r]))
            frag = split[j % F]
            weights = lengths if sched.get("weights") == "steps" else None
            sent = [{i: job.params[r][i].detach().clone() for i in frag} for r in range(n)]
            c = job.common_point(frag, sent, weights)
            with torch.no_grad():
                for r in range(n):
                    if tau == 0:  # within step t[r]'s step(): what it returns is averaged
                        for i in frag:
                            job.params[r][i].copy_(c[i])
                        traj[r][-1] = flat_params(job.models[r])
                    else:
                        job.pending[r].append([t[r] + 1 + tau, {i: c[i] - sent[r][i] for i in frag}])
    if spec.get("finalize"):
        job.finish()
    return [torch.stack(tr) for tr in traj], [flat_params(m) for m in job.models], None
