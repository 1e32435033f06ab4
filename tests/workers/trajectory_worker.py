"""Run training scenarios with DistributedLocalSGD and save every rank's parameters per step.

Usage (under horovodrun): trajectory_worker.py --out DIR --scenarios JSON
Each scenario: name, opt, opt_kwargs, seed, and either interval (+ warmup) with steps, or
schedule (see common.schedule_from_spec) with steps per rank computed from it; optionally
fused (None/True/False), backward_passes (k backward passes of micro-batches per step,
with backward_passes_per_step=k), hvd_kwargs (more DistributedOptimizer arguments; "op" by
name), resume_at (checkpoint round trip after that step; resume_after_round:
after the step that completes that round -- with different step counts per rank that is the
point where all ranks can restart together), lr_step
([step_size, gamma] for StepLR), broadcast_state (call hvd.broadcast_optimizer_state),
extra_steps_per_rank (rank r runs r * that many more steps: uneven data), outer (SGD
keyword arguments of an outer optimizer, outer=; with outer_kind "slowmo" the keyword arguments
of prsgd_hvd.outer.slowmo(opt, ...), the exact SlowMo over the inner optimizer), outer_device
(outer_device=) and stage_bytes (prsgd_hvd.outer_host.STAGE_BYTES for this scenario), delay and fragments (streaming rounds), finalize
(train inside ``with opt.local_sgd():``, which ends with finalize()) and model ("mixed":
common.MixedNet, fp32 + fp16 + bf16 parameters, saved as float32 vectors).
"""
import argparse
import io
import json
import os

import torch

import prsgd_hvd as hvd
from prsgd_hvd import outer_host
from common import (flat_params, flat_params_f32, loss_fn, make_mixed_model, make_model,
                    make_optimizer, mixed_loss_fn, schedule_from_spec, steps_for_rank)

# PRSGD_TEST_DEVICE=cuda: the same scenarios with the model on the GPU (every rank on cuda:0,
# Horovod staging the averages through host memory when it was built without GPU operations).
DEVICE = torch.device(os.environ.get("PRSGD_TEST_DEVICE", "cpu"))
STAGE_BYTES = outer_host.STAGE_BYTES


def _mixed(spec):
    """model "mixed": fp32 + fp16 + bf16 parameters in one optimizer (common.MixedNet)."""
    return spec.get("model") == "mixed"


def build(spec, rank):
    model = (make_mixed_model if _mixed(spec) else make_model)(spec["seed"]).to(DEVICE)
    opt = make_optimizer(spec, model)
    interval = schedule_from_spec(spec["schedule"], hvd) if "schedule" in spec else spec["interval"]
    process_set = None
    if "process_set_groups" in spec:  # every rank registers every group, then uses its own
        process_set = _process_sets(spec["process_set_groups"])[rank]
    hvd_kwargs = dict(spec.get("hvd_kwargs", {}))
    if "op" in hvd_kwargs:
        hvd_kwargs["op"] = getattr(hvd, hvd_kwargs["op"])
    if spec.get("backward_passes"):
        hvd_kwargs["backward_passes_per_step"] = spec["backward_passes"]
    opt = hvd.DistributedLocalSGD(opt, interval=interval, process_set=process_set, **hvd_kwargs,
                                  named_parameters=model.named_parameters(),
                                  warmup_steps=spec.get("warmup", 0), fused=spec.get("fused"),
                                  overlap=spec.get("overlap", True),
                                  compression=spec.get("compression"),
                                  error_feedback=spec.get("error_feedback", True),
                                  delay=spec.get("delay", 0), fragments=spec.get("fragments", 1),
                                  **_outer(spec, opt))
    sched = None
    if spec.get("lr_step"):
        size, gamma = spec["lr_step"]
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=size, gamma=gamma)
    return model, opt, sched


def _outer(spec, opt):
    """"outer": SGD keyword arguments of an outer optimizer (DiLoCo), if the scenario has one;
    SlowMo's (over the inner optimizer ``opt``) with outer_kind "slowmo"."""
    if not spec.get("outer"):
        return {}
    kwargs = dict(spec["outer"])
    if spec.get("outer_kind") == "slowmo":
        outer = hvd.outer.slowmo(opt, **kwargs)
    else:
        outer = lambda ps: torch.optim.SGD(ps, **kwargs)  # noqa: E731
    return {"outer": outer, "outer_device": spec.get("outer_device")}


def _process_sets(groups):
    """rank -> its process set: consecutive equal groups, reused if they exist already
    (HOROVOD_DYNAMIC_PROCESS_SETS=1 lets them be created)."""
    from prsgd_hvd.collectives import group_process_set
    members = [r for g in groups for r in g]
    mine = group_process_set(members, len(groups[0]), hvd.rank())
    return {hvd.rank(): mine}


def run(spec, rank):
    outer_host.STAGE_BYTES = spec.get("stage_bytes", STAGE_BYTES)
    model, opt, sched = build(spec, rank)
    if spec.get("model") == "mixed" and rank != 0:
        # Spoil this rank's copy: hvd.broadcast_parameters must bring rank 0's back, the bf16
        # tensors included (Horovod 0.28 alone refuses them; prsgd_hvd's broadcast takes them).
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    if spec.get("broadcast_state"):
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        assert opt.local_step == 0 and opt.rounds == 0, "broadcast_optimizer_state moved counters"
    traj, divergence = [], []
    rebuilt = spec.get("resume_at") or spec.get("resume_after_round")
    if spec.get("finalize") and not rebuilt:
        with opt.local_sgd():  # the context-manager form of finalize()
            opt, model = _train(spec, rank, model, opt, sched, traj, divergence)
    else:
        opt, model = _train(spec, rank, model, opt, sched, traj, divergence)
        if spec.get("finalize"):
            opt.finalize()
    flat = flat_params_f32 if _mixed(spec) else flat_params
    return {"traj": torch.stack(traj), "divergence": divergence, "final": flat(model), "local_step": opt.local_step,
            "rounds": opt.rounds, "stats": opt.stats(),
            "is_instance": isinstance(opt, type(make_optimizer(spec, make_model(0)))),
            "device": str(next(model.parameters()).device), "extension": hvd.ops.has_extension(),
            "anchor_gap": _anchor_gap(opt) if spec.get("outer") else None,
            "outer_placement": opt._local_sgd.outer.placement() if spec.get("outer") else None}


def _anchor_gap(opt):
    """max |anchor - parameter| over the parameters' segments of the whole set's anchor (the
    16-bit deltas' origin), or None when no anchor is kept."""
    averager = opt._local_sgd.world.averager
    layout, anchor = averager.layout, averager.anchor
    if layout is None or not anchor.kept or not anchor.ready(len(layout.buckets)):
        return None
    n = len(opt._local_sgd.contents.params())
    gap = 0.0
    for b in layout.buckets:
        for j, pos in enumerate(b.positions):
            if pos < n:
                t = b.tensors[j]
                seg = anchor.bucket(b.index)[b.offsets[j]:b.offsets[j] + t.numel()]
                gap = max(gap, float((seg - t.detach().reshape(-1).to(seg.dtype)).abs().max()))
    return gap


def _train(spec, rank, model, opt, sched, traj, divergence):
    loss, flat = (mixed_loss_fn, flat_params_f32) if _mixed(spec) else (loss_fn, flat_params)
    for t in range(1, steps_for_rank(spec, rank, hvd.size()) + 1):
        opt.zero_grad()
        k = spec.get("backward_passes", 1)
        for j in range(k):  # the micro-batches of one step (pytorch_imagenet_resnet50.py)
            (loss(model, spec["seed"], rank, t if k == 1 else k * t + j, device=DEVICE) / k).backward()
        opt.step()
        if sched is not None:
            sched.step()
        traj.append(flat(model))
        divergence.append(opt.stats()["divergence"])
        resume = spec.get("resume_at") == t or (
            spec.get("resume_after_round") == opt.rounds and not getattr(opt, "_resumed", False))
        if resume:
            # Checkpoint round trip mid-interval into freshly built objects.
            buf = io.BytesIO()
            ckpt = {"model": model.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict() if sched else None}
            torch.save(ckpt, buf)
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=False)
            model, opt, sched = build(spec, rank)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            if sched is not None:
                sched.load_state_dict(ckpt["sched"])
            assert opt.local_step == t, (opt.local_step, t)
            opt._resumed = True
    return opt, model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenarios", required=True)
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    results = {spec["name"]: run(spec, hvd.rank()) for spec in json.loads(args.scenarios)}
    torch.save(results, f"{args.out}/rank{hvd.rank()}.pt")
    # Horovod's controller is global: a rank that exits while others still average inside a
    # process set shuts Horovod down under them. Leave together.
    hvd.allreduce(torch.zeros(1), name="trajectory_worker.done")


if __name__ == "__main__":
    main()
