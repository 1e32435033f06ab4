"""An outer job with ``outer_device="cpu"`` against the same job without it, on one device.

    python scripts/check_outer_device.py                 # CUDA (make gpu-check runs it)
    python scripts/check_outer_device.py --device cpu --small   # the same code path, no GPU

One rank (``hvd.init()`` in a world of one: the outer step still applies), an MLP of
``--layers`` square ``--width`` layers, inner SGD with momentum, interval 4, 12 steps, for two
outer optimizers: DiLoCo's Nesterov SGD (the fused outer kernel) and Adam (the outer
optimizer's own ``step()``, once per staged chunk). Each runs with ``outer_device=None`` and
``"cpu"`` from the same start on the same data. Checks, exit 1 if one fails:

* the parameters after the last step are the same bits both ways;
* with the option theta0 and the outer state are found in host memory, page-locked on CUDA;
* on CUDA, device memory: between rounds the job holds about two (Adam: three) copies of the
  model less, and its peak is lower.

Prints one line per run (peak and steady device memory, time per outer round) and a SUMMARY.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

import prsgd_hvd as hvd
from prsgd_hvd.outer import diloco

MIB = float(1 << 20)


def build(width: int, layers: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods).to(device)


def run(args, device, outer_name, outer_device):
    model = build(args.width, args.layers, device)
    inner = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    outer = diloco() if outer_name == "diloco" else (lambda ps: torch.optim.Adam(ps, lr=1e-3))
    opt = hvd.DistributedLocalSGD(inner, interval=args.interval, outer=outer,
                                  outer_device=outer_device)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, args.width, generator=g).to(device),
                torch.randn(args.batch, args.width, generator=g).to(device))
               for _ in range(args.steps)]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    round_seconds = []
    for t, (x, y) in enumerate(batches, start=1):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if t % args.interval == 0:  # a step with an outer round (Algorithm 1: before its update)
            round_seconds.append(time.perf_counter() - start)
    opt.zero_grad(set_to_none=True)
    steady = torch.cuda.memory_allocated(device) / MIB if cuda else float("nan")
    peak = torch.cuda.max_memory_allocated(device) / MIB if cuda else float("nan")
    final = [p.detach().cpu().clone() for p in model.parameters()]
    where = opt._local_sgd.outer.placement()
    stats = opt.stats()
    del opt, inner, model, batches
    if cuda:
        torch.cuda.empty_cache()
    return {"final": final, "steady_mib": steady, "peak_mib": peak, "where": where,
            "round_ms": 1e3 * sorted(round_seconds)[len(round_seconds) // 2],
            "fused_outer_rounds": stats["fused_outer_rounds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--interval", type=int, default=4)
    ap.add_argument("--small", action="store_true", help="a 64-wide, 3-layer model (CPU dry run)")
    args = ap.parse_args()
    if args.small:
        args.width, args.layers, args.batch = 64, 3, 8
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("check_outer_device: no CUDA device here (use --device cpu --small)")
        return 1
    hvd.init()
    model_mib = sum(p.numel() * 4 for p in build(args.width, args.layers, "cpu").parameters()) / MIB
    print(f"check_outer_device: {args.layers} x Linear({args.width}, {args.width}) on {device}, "
          f"{model_mib:.0f} MiB of parameters; extension loaded: {hvd.ops.has_extension()}")
    failures, lines = [], []
    for outer_name, copies in (("diloco", 2), ("adam", 3)):
        off = run(args, device, outer_name, None)
        on = run(args, device, outer_name, "cpu")
        same = all(torch.equal(a, b) for a, b in zip(off["final"], on["final"]))
        if not same:
            failures.append(f"{outer_name}: the parameters differ with outer_device='cpu'")
        w = on["where"]
        if w["theta"] != ["cpu"] or w["state"] != ["cpu"] or w["chunks"] < 1:
            failures.append(f"{outer_name}: theta0/state not in host memory or not staged: {w}")
        if device.type == "cuda":
            if not w["pinned"]:
                failures.append(f"{outer_name}: host copies not page-locked: {w}")
            saved = off["steady_mib"] - on["steady_mib"]
            # between rounds: theta0 + state (copies x the model) left the device
            if saved < 0.9 * copies * model_mib:
                failures.append(f"{outer_name}: between rounds only {saved:.0f} MiB less on the "
                                f"device, expected about {copies * model_mib:.0f}")
            if not on["peak_mib"] < off["peak_mib"]:
                failures.append(f"{outer_name}: peak device memory not lower with the option")
        for label, r in (("outer_device=None ", off), ("outer_device='cpu'", on)):
            lines.append(f"{outer_name:6s} {label}: peak {r['peak_mib']:8.1f} MiB, between rounds "
                         f"{r['steady_mib']:8.1f} MiB, outer-round step {r['round_ms']:8.2f} ms "
                         f"(median), fused outer rounds {r['fused_outer_rounds']}")
        lines.append(f"{outer_name:6s} same bits: {same}; staged chunks per round {w['chunks']}, "
                     f"at most {w['staged_bytes_max'] / MIB:.1f} MiB staged at once; pinned "
                     f"{w['pinned']}")
    print("SUMMARY check_outer_device")
    print("\n".join(lines))
    for f in failures:
        print("FAIL", f)
    print("OK" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
