"""One PR-SGD averaging round: fused kernels vs the unfused torch path, against copy bandwidth.

Per round and model (parameter shapes of ResNet-20/CIFAR and ResNet-50/ImageNet, written out
below; no torchvision), SGD with momentum 0.9 and weight decay, the allreduce itself excluded:

  fused    ops.flatten(params, out=flat)                      pack          8 B/elem
           ops.unflatten_average_sgd_(flat, params, ...)      avg + step   20 B/elem
  unfused  torch.cat([p.reshape(-1)]) ; flat /= N ; torch._foreach_copy_(params, views) ;
           torch.optim.SGD(foreach=True).step()

The fused outer round (``outer=torch.optim.SGD``, DiLoCo's Nesterov momentum, with the inner
SGD restart fused in) is measured beside it in the same run, interleaved with the plain fused
round: ``ops.unflatten_average_outer_sgd_`` reads flat, theta0, the outer buffer, the grad and
the inner buffer and writes theta0, the outer buffer, the param and the inner buffer: 36 B/elem
(16 more than avg+step), 44 with the pack. Printed: its time, its fraction of the copy_
ceiling, and the time ratio outer/plain (bytes alone predict 1.8x for the kernel, 1.57x for
the round).

With divergence telemetry (``divergence=`` on the fused avg+step: the kernel also reads each
param before overwriting it, +4 B/elem fp32, so 24 B/elem) the avg+step time is measured
again in the same run, interleaved with the plain one; the "div ms" column and "+div" ratio.

The delayed merge of streaming rounds (``delay=``, NOTE: [streaming] in prsgd_hvd/streaming.py:
x <- x + (c - x_sent), fused with the next step's SGD update) is measured in the same run, one
pass against the three it took before, interleaved, on the round's padded layout (ops.PADDED):

  three   ops.flatten(params, out=payload)                    pack          8 B/elem
          payload.add_(correction)                            add          12 B/elem
          ops.unflatten_average_sgd_(payload, ..., scale=1)   write + step 20 B/elem  (40)
  one     ops.unflatten_average_sgd_(correction, ..., scale=1, accumulate=True)
                                                              24 B/elem (x, correction, grad,
                                                              buffer in; x, buffer out)

and the same without the SGD update (a non-SGD inner optimizer, or fragments=F > 1, where the
update runs on its own): 8 + 12 + 8 = 28 B/elem against accumulate's 12. Both forms are
checked bit for bit against each other before they are timed. Bytes predict 1.67x and 2.33x.

Bytes per element follow the performance model in docs/benchmarks.md (fp32, SGD with momentum): fused 8 + 20 = 28;
unfused "about 44" of the performance model. Our own count of what the unfused path moves is printed too
(cat 8, /=N 8, copy back 8, foreach SGD with weight decay 12 + 8 + 12 + 12 = 44, so 68 in all).
The ceiling is a large tensor copy_ (read + write) measured in the same run on the same device
and thread count. Times are medians over --repeats after warm-up.

    python benchmarks/bench_kernels.py --device cpu --threads 2 --repeats 20
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from prsgd_hvd import ops

# --------------------------------------------------------------------------- model shapes


def resnet20_cifar_shapes():
    """ResNet-20 for CIFAR-10 (He et al. 2016, option A shortcuts, bias-free convs): 269,722 parameters."""
    shapes = [(16, 3, 3, 3), (16,), (16,)]
    cin = 16
    for width in (16, 32, 64):
        for _ in range(3):
            shapes += [(width, cin, 3, 3), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            cin = width
    return shapes + [(10, 64), (10,)]


def resnet50_shapes():
    """torchvision's resnet50 (bottleneck v1.5): 25,557,032 parameters."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, cin, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, cin, 1, 1), (4 * width,), (4 * width,)]
            cin = 4 * width
    return shapes + [(1000, 2048), (1000,)]


MODELS = {"resnet20": resnet20_cifar_shapes, "resnet50": resnet50_shapes}

FUSED_BYTES = 8 + 20        # the performance model in docs/benchmarks.md
STEP_DIV_BYTES = 20 + 4     # avg+step with divergence: the old param is read too
UNFUSED_BYTES_DESIGN = 44   # the performance model in docs/benchmarks.md ("about 44")
UNFUSED_BYTES_COUNTED = 8 + 8 + 8 + 44
OUTER_STEP_BYTES = 20 + 16    # + theta0 and the outer buffer, each read and written
OUTER_ROUND_BYTES = 8 + OUTER_STEP_BYTES
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9  # DiLoCo
MERGE_SGD_BYTES = (8 + 12 + 20, 24)  # the delayed merge with the SGD update: three passes, one
MERGE_BYTES = (8 + 12 + 8, 12)       # without it

LR, MOMENTUM, WEIGHT_DECAY, WORLD = 0.1, 0.9, 5e-4, 4


# --------------------------------------------------------------------------- timing


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, repeats, numel=64 * 2**20):
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, repeats)
    return 8 * numel / t / 1e9  # read + write, fp32


# --------------------------------------------------------------------------- one model


def bench_model(name, device, repeats, gen):
    shapes = MODELS[name]()
    numel = sum(torch.Size(s).numel() for s in shapes)

    def rand(s):
        return torch.randn(s, generator=gen).to(device)

    init = [rand(s) for s in shapes]
    grads = [rand(s) * 1e-2 for s in shapes]
    scale = 1.0 / WORLD

    # fused: our kernels
    params = [p.clone() for p in init]
    bufs = [torch.zeros_like(p) for p in init]
    flat = torch.empty(numel, device=device)

    def pack():
        ops.flatten(params, out=flat)

    def avg_step():
        ops.unflatten_average_sgd_(flat, params, grads, bufs, scale=scale, lr=LR,
                                   momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    divergence = torch.zeros(1, dtype=torch.float64, device=device)

    def avg_step_div():
        ops.unflatten_average_sgd_(flat, params, grads, bufs, scale=scale, lr=LR,
                                   momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                   divergence=divergence)

    def fused():
        pack()
        avg_step()

    # the fused outer round: theta0 and the outer momentum buffer besides the params
    thetas = [p.clone() for p in init]
    outer_bufs = [torch.zeros_like(p) for p in init]

    def outer_step():
        ops.unflatten_average_outer_sgd_(
            flat, params, thetas, outer_bufs, grads, bufs, scale=scale, outer_lr=OUTER_LR,
            outer_momentum=OUTER_MOMENTUM, outer_nesterov=True, lr=LR, momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY)

    def fused_outer():
        pack()
        outer_step()

    # unfused: what one writes with plain torch
    tparams = [torch.nn.Parameter(p.clone()) for p in init]
    for p, g in zip(tparams, grads):
        p.grad = g.clone()
    opt = torch.optim.SGD(tparams, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                          foreach=True)
    opt.step()  # creates the momentum buffers, as after the first local step
    numels = [p.numel() for p in tparams]

    def unfused():
        with torch.no_grad():
            tflat = torch.cat([p.reshape(-1) for p in tparams])
            tflat /= WORLD
            torch._foreach_copy_(tparams, [v.view_as(p) for v, p in
                                           zip(tflat.split(numels), tparams)])
        opt.step()

    t_pack = median_time(pack, device, repeats)
    # divergence off / on, interleaved like fused / unfused below
    ts, td = [], []
    for _ in range(3):
        ts.append(median_time(avg_step, device, max(1, repeats // 3)))
        td.append(median_time(avg_step_div, device, max(1, repeats // 3)))
    t_step, t_step_div = min(ts), min(td)
    # interleave the two round variants so drift (turbo, other load) hits both alike
    tf, tu = [], []
    for _ in range(3):
        tf.append(median_time(fused, device, max(1, repeats // 3)))
        tu.append(median_time(unfused, device, max(1, repeats // 3)))
    t_fused, t_unfused = min(tf), min(tu)
    # the fused outer round against the plain fused round (kernel alone, and with the pack),
    # interleaved
    tp, to, rp, ro = [], [], [], []
    for _ in range(3):
        tp.append(median_time(avg_step, device, max(1, repeats // 3)))
        to.append(median_time(outer_step, device, max(1, repeats // 3)))
        rp.append(median_time(fused, device, max(1, repeats // 3)))
        ro.append(median_time(fused_outer, device, max(1, repeats // 3)))
    merge = bench_merge(shapes, init, grads, device, repeats, gen)
    return dict(model=name, numel=numel, tensors=len(shapes), t_pack=t_pack, t_step=t_step,
                t_step_div=t_step_div, t_fused=t_fused, t_unfused=t_unfused,
                t_plain_step=min(tp), t_outer_step=min(to), t_plain_round=min(rp),
                t_outer_round=min(ro), **merge)


def bench_merge(shapes, init, grads, device, repeats, gen):
    """The delayed merge (module docstring): three passes against one, with and without the
    SGD update, interleaved; the two forms checked bit for bit first."""
    total = ops.segment_layout(shapes, torch.float32, align=ops.PADDED)[-1]
    correction = (torch.randn(total, generator=gen) * 1e-3).to(device)
    payload = torch.empty_like(correction)
    params = [p.clone() for p in init]
    bufs = [torch.zeros_like(p) for p in init]
    sgd = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, align=ops.PADDED)

    def three_sgd(ps=params, bs=bufs):
        ops.flatten(ps, out=payload, align=ops.PADDED)
        payload.add_(correction)
        ops.unflatten_average_sgd_(payload, ps, grads, bs, scale=1.0, **sgd)

    def one_sgd(ps=params, bs=bufs):
        ops.unflatten_average_sgd_(correction, ps, grads, bs, scale=1.0, accumulate=True, **sgd)

    def three(ps=params):
        ops.flatten(ps, out=payload, align=ops.PADDED)
        payload.add_(correction)
        ops.unflatten_average_(payload, ps, scale=1.0, align=ops.PADDED)

    def one(ps=params):
        ops.unflatten_average_(correction, ps, scale=1.0, align=ops.PADDED, accumulate=True)

    for a, b in ((three_sgd, one_sgd), (three, one)):
        pa, pb = [p.clone() for p in init], [p.clone() for p in init]
        ba, bb = [torch.ones_like(p) for p in init], [torch.ones_like(p) for p in init]
        if a is three_sgd:
            a(pa, ba)
            b(pb, bb)
        else:
            a(pa)
            b(pb)
        assert all(torch.equal(x, y) for x, y in zip(pa + ba, pb + bb)), \
            "the one-pass merge differs from the three-pass one"
    t = {k: [] for k in ("t_merge3_sgd", "t_merge1_sgd", "t_merge3", "t_merge1")}
    for _ in range(3):
        for k, fn in zip(t, (three_sgd, one_sgd, three, one)):
            t[k].append(median_time(fn, device, max(1, repeats // 3)))
    return {k: min(v) for k, v in t.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--models", default="resnet20,resnet50")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {args.device} ({dev_name}), "
          f"threads {torch.get_num_threads()}, extension loaded: {ops.has_extension()}, "
          f"repeats {args.repeats} (median)")
    # Best of three, so that a busy moment cannot lower the ceiling and flatter the kernels.
    copy_gbs = max(copy_bandwidth(args.device, args.repeats) for _ in range(3))
    print(f"copy_ ceiling (256 MiB fp32, read+write, best of 3): {copy_gbs:.1f} GB/s")
    print(f"bytes/elem: fused {FUSED_BYTES} (pack 8 + avg+step 20); avg+step with divergence "
          f"{STEP_DIV_BYTES}; unfused {UNFUSED_BYTES_DESIGN} (the performance model), "
          f"{UNFUSED_BYTES_COUNTED} by our count")
    print()
    hdr = (f"{'model':9} {'params':>10} {'tensors':>7} | {'pack ms':>8} {'GB/s':>6} | "
           f"{'avg+step ms':>11} {'GB/s':>6} | {'div ms':>7} {'GB/s':>6} {'+div':>6} | "
           f"{'fused ms':>8} {'GB/s':>6} {'%copy':>6} | "
           f"{'unfused ms':>10} {'GB/s':>6} {'%copy':>6} | {'speedup':>7}")
    print(hdr)
    print("-" * len(hdr))
    outer_rows = []
    for name in args.models.split(","):
        r = bench_model(name, args.device, args.repeats, gen)
        n = r["numel"]
        gbs = lambda b, t: b * n / t / 1e9  # noqa: E731
        fused_gbs = gbs(FUSED_BYTES, r["t_fused"])
        unfused_gbs = gbs(UNFUSED_BYTES_DESIGN, r["t_unfused"])
        print(f"{name:9} {n:>10,} {r['tensors']:>7} | {r['t_pack'] * 1e3:8.3f} "
              f"{gbs(8, r['t_pack']):6.1f} | {r['t_step'] * 1e3:11.3f} "
              f"{gbs(20, r['t_step']):6.1f} | {r['t_step_div'] * 1e3:7.3f} "
              f"{gbs(STEP_DIV_BYTES, r['t_step_div']):6.1f} "
              f"{r['t_step_div'] / r['t_step']:5.2f}x | {r['t_fused'] * 1e3:8.3f} {fused_gbs:6.1f} "
              f"{100 * fused_gbs / copy_gbs:5.0f}% | {r['t_unfused'] * 1e3:10.3f} "
              f"{unfused_gbs:6.1f} {100 * unfused_gbs / copy_gbs:5.0f}% | "
              f"{r['t_unfused'] / r['t_fused']:6.2f}x")
        outer_rows.append(r)
    print()
    print(f"fused outer round (outer=SGD lr {OUTER_LR}, momentum {OUTER_MOMENTUM}, Nesterov; inner "
          f"SGD fused): bytes/elem kernel {OUTER_STEP_BYTES} vs avg+step 20, round "
          f"{OUTER_ROUND_BYTES} vs {FUSED_BYTES}; %copy = GB/s over the copy_ ceiling")
    hdr = (f"{'model':9} | {'avg+step ms':>11} {'%copy':>6} | {'outer ms':>8} {'%copy':>6} "
           f"{'ratio':>6} | {'round ms':>8} {'%copy':>6} | {'outer rnd':>9} {'%copy':>6} {'ratio':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in outer_rows:
        n = r["numel"]
        pct = lambda b, t: 100 * b * n / t / 1e9 / copy_gbs  # noqa: E731
        print(f"{r['model']:9} | {r['t_plain_step'] * 1e3:11.3f} {pct(20, r['t_plain_step']):5.0f}% | "
              f"{r['t_outer_step'] * 1e3:8.3f} {pct(OUTER_STEP_BYTES, r['t_outer_step']):5.0f}% "
              f"{r['t_outer_step'] / r['t_plain_step']:5.2f}x | "
              f"{r['t_plain_round'] * 1e3:8.3f} {pct(FUSED_BYTES, r['t_plain_round']):5.0f}% | "
              f"{r['t_outer_round'] * 1e3:9.3f} {pct(OUTER_ROUND_BYTES, r['t_outer_round']):5.0f}% "
              f"{r['t_outer_round'] / r['t_plain_round']:5.2f}x")
    print()
    print(f"delayed merge (streaming delay=; x += correction, padded layout): three passes "
          f"(flatten, add, write) vs one (accumulate); bytes/elem with SGD's update "
          f"{MERGE_SGD_BYTES[0]} vs {MERGE_SGD_BYTES[1]}, without {MERGE_BYTES[0]} vs "
          f"{MERGE_BYTES[1]}; %copy = GB/s over the copy_ ceiling")
    hdr = (f"{'model':9} | {'+sgd 3-pass ms':>14} {'%copy':>6} | {'1-pass ms':>9} {'%copy':>6} "
           f"{'ratio':>6} | {'plain 3-pass ms':>15} {'%copy':>6} | {'1-pass ms':>9} {'%copy':>6} "
           f"{'ratio':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in outer_rows:
        n = r["numel"]
        pct = lambda b, t: 100 * b * n / t / 1e9 / copy_gbs  # noqa: E731
        print(f"{r['model']:9} | {r['t_merge3_sgd'] * 1e3:14.3f} "
              f"{pct(MERGE_SGD_BYTES[0], r['t_merge3_sgd']):5.0f}% | "
              f"{r['t_merge1_sgd'] * 1e3:9.3f} {pct(MERGE_SGD_BYTES[1], r['t_merge1_sgd']):5.0f}% "
              f"{r['t_merge3_sgd'] / r['t_merge1_sgd']:5.2f}x | "
              f"{r['t_merge3'] * 1e3:15.3f} {pct(MERGE_BYTES[0], r['t_merge3']):5.0f}% | "
              f"{r['t_merge1'] * 1e3:9.3f} {pct(MERGE_BYTES[1], r['t_merge1']):5.0f}% "
              f"{r['t_merge3'] / r['t_merge1']:5.2f}x")


if __name__ == "__main__":
    main()
