"""The averaging round's kernels on a GPU, timed right, and a 1-rank training step end to end.

Three parts (``--part``), each its own process under scripts/gpu_check.sh:

  kernels  CUDA events around many back-to-back calls, and CUDA graph replay, median and spread
           over interleaved rounds, the copy_ ceiling measured the same way in the same run.
           Buffers rotate between two sets, so L2 (60 MB on an H200) cannot serve a repeat.
           Per model and kernel (bytes per fp32 element, each input read once and each output
           written once):
             pack        ops.flatten                              8  (param in, flat out)
             avg         ops.unflatten_average_                   8  (flat in, param out)
             avg+step    ops.unflatten_average_sgd_, momentum    20  (flat, grad, buf in; param, buf out)
             avg+step+div  the same with divergence=             24  (+ the old param in)
             round       pack + avg+step                         28
           in the padded layout (align=16, what the package uses) and the packed one (align=1),
           and a sweep of the kernels' launch configurations (NOTE: [Launch configuration] in
           csrc/cuda/multi_segment.h): the configuration before issue 21 against the default
           and the variants between them, in the same run.
  profile  a few launches of the pack and avg+step kernels, for `ncu` (scripts/gpu_check.sh
           runs this part under ncu --clock-control none) or, with --torch-profiler, under
           torch.profiler with CUDA activities (kernel time, launch count).
  e2e      one training step of ResNet-50-sized parameters (161 tensors, 25.6M) with one rank:
           DistributedLocalSGD(SGD, interval=1) against torch.optim.SGD(fused=True) and
           (foreach=True), CUDA-event timed, and the check that ours costs no more than torch's
           fused step plus the round's extra bytes at the measured copy bandwidth. Needs Horovod
           (hvd.init() with one process, no horovodrun).

Models: resnet50 (161 tensors, 25,557,032 params), flat1g (one tensor of 256M fp32 = 1 GiB),
flat1g_300 (300 tensors of odd sizes, 256M fp32 in all: the packed layout misaligns most).

    python benchmarks/bench_gpu_round.py --part kernels --json out.json
    python benchmarks/bench_gpu_round.py --device cpu --small --part kernels   (code path check)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))



def _import_ops():
    """prsgd_hvd.ops. The package imports Horovod, which scripts/gpu_check.sh builds only after
    this benchmark has run (the kernels' figures come first in a short lease): without
    Horovod, ops.py and the compiled kernels are loaded without running the package's
    __init__ (they need nothing of Horovod). The e2e part needs the real package."""
    try:
        from prsgd_hvd import ops as ops_module
        return ops_module
    except ImportError as e:
        if "horovod" not in str(e):
            raise
        import importlib
        import types
        for name in [m for m in sys.modules if m == "prsgd_hvd" or m.startswith("prsgd_hvd.")]:
            del sys.modules[name]
        root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prsgd_hvd")
        pkg = types.ModuleType("prsgd_hvd")
        pkg.__path__ = [root]
        sys.modules["prsgd_hvd"] = pkg
        print(f"(Horovod not importable: prsgd_hvd.ops loaded without the package's __init__)")
        return importlib.import_module("prsgd_hvd.ops")


ops = _import_ops()
from bench_kernels import resnet50_shapes  # noqa: E402  (imports prsgd_hvd.ops: after the above)

LR, MOMENTUM, WEIGHT_DECAY, WORLD = 0.1, 0.9, 5e-4, 4
PADDED = 16
BYTES = {"pack": 8, "avg": 8, "avg+step": 20, "avg+step+div": 24, "round": 28}

# NOTE: [Launch configuration]: (persistent, split_log2, unroll); the default first.
CONFIGS = {
    "before": (1, 0, 1),          # persistent grid, whole chunks, 1 word per stream in flight
    "persist+unroll": (1, 0, 0),
    "chunk/block": (0, 0, 1),
    "chunk/block+unroll": (0, 0, 0),
    "half/block+unroll": (0, 1, 0),
    "quarter/block": (0, 2, 1),
    "quarter/block+unroll2": (0, 2, 2),
    "quarter/block+unroll4": (0, 2, 4),
    "eighth/block+unroll": (0, 3, 0),
}


def model_shapes(name, small):
    if name == "resnet50":
        shapes = resnet50_shapes()
        return [s for s in shapes][: 20 if small else None]
    total = (2**16 if small else 2**28)
    if name == "flat1g":
        return [(total,)]
    if name == "flat1g_300":
        n = 300
        base = total // n
        # Odd sizes around the mean (so the packed layout misaligns most segments), summing to total.
        j = min(1000, base // 4)
        sizes = [(base + (i * 7919) % (2 * j + 1) - j) | 1 for i in range(n - 1)]
        sizes.append(total - sum(sizes))
        return [(s,) for s in sizes]
    raise ValueError(name)


# --------------------------------------------------------------------------- launch configuration


def has_launch_config():
    try:
        return hasattr(torch.ops, "prsgd_hvd_cuda") and \
            hasattr(torch.ops.prsgd_hvd_cuda, "set_launch_config")
    except Exception:  # noqa: BLE001 - a CPU build has no such namespace
        return False


def set_config(cfg):
    if cfg is not None and has_launch_config():
        torch.ops.prsgd_hvd_cuda.set_launch_config(*cfg)


_EXERCISE = [False]  # --exercise-configs: CPU code-path check of the configuration paths


def default_config():
    if has_launch_config():
        return tuple(torch.ops.prsgd_hvd_cuda.default_launch_config())
    return (0, 2, 0) if _EXERCISE[0] else None


# --------------------------------------------------------------------------- timing


class Timer:
    """Per-call times of fn (which must do the same work every call) by three methods:
    events over `calls` back-to-back calls, replay of a graph of `calls` calls, and host time
    with a synchronize around each call (the method of the table before issue 21)."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def events(self, fn, calls):
        if not self.cuda:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - t0) / calls
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / calls

    def host(self, fn):
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def capture(self, fn, calls):
        """A CUDA graph of `calls` calls of fn (None on the CPU or if capture fails)."""
        if not self.cuda:
            return None
        fn()  # warm-up: tables on the device (NOTE: [Tables in CUDA graphs])
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                for _ in range(calls):
                    fn()
        except Exception as e:  # noqa: BLE001 - reported, the events figures still stand
            print(f"  graph capture failed: {type(e).__name__}: {e}")
            return None
        torch.cuda.synchronize()
        return g

    def replay(self, g, calls):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / calls


def stats(times):
    s = sorted(times)
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "n": len(s)}


def measure(timer, variants, calls, rounds, graphs=True, host=False):
    """variants: name -> (fn, config). Rounds interleave the variants, so that drift in clocks
    or temperature hits all of them alike. Returns name -> {"events": stats, "graph": stats}."""
    out = {name: {"events": [], "graph": [], "host": []} for name in variants}
    captured = {}
    for name, (fn, cfg) in variants.items():
        set_config(cfg)
        for _ in range(2):
            fn()
        if graphs:
            captured[name] = timer.capture(fn, calls)
    timer.sync()
    for _ in range(rounds):
        for name, (fn, cfg) in variants.items():
            set_config(cfg)
            out[name]["events"].append(timer.events(fn, calls))
            if captured.get(name) is not None:
                out[name]["graph"].append(timer.replay(captured[name], calls))
            if host:
                out[name]["host"].append(timer.host(fn))
    set_config(default_config())
    del captured
    return {name: {k: stats(v) for k, v in r.items() if v} for name, r in out.items()}


# --------------------------------------------------------------------------- workloads


class Workload:
    """Two rotating sets of params, grads, momentum buffers and flat buffers for one model and
    layout; every call uses the next set."""

    def __init__(self, shapes, device, align, gen, sets=2):
        self.numel = sum(torch.Size(s).numel() for s in shapes)
        self.tensors = len(shapes)
        self.align = align
        self.sets = []
        offsets = ops.segment_layout([torch.empty(s, device="meta") for s in shapes],
                                     torch.float32, align=align)
        for _ in range(sets):
            def rnd(s, scale=1.0):
                return torch.randn(s, device=device, generator=gen) * scale
            params = [rnd(s) for s in shapes]
            self.sets.append(dict(
                params=params, grads=[rnd(s, 1e-2) for s in shapes],
                bufs=[rnd(s, 1e-2) for s in shapes],
                flat=torch.randn(offsets[-1], device=device, generator=gen),
                div=torch.zeros(1, dtype=torch.float64, device=device)))
        self.i = 0

    def next(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s

    def pack(self):
        s = self.next()
        ops.flatten(s["params"], out=s["flat"], align=self.align)

    def avg(self):
        s = self.next()
        ops.unflatten_average_(s["flat"], s["params"], scale=1.0 / WORLD, align=self.align)

    def _step(self, s, div):
        ops.unflatten_average_sgd_(s["flat"], s["params"], s["grads"], s["bufs"],
                                   scale=1.0 / WORLD, lr=LR, momentum=MOMENTUM,
                                   weight_decay=WEIGHT_DECAY, align=self.align,
                                   divergence=s["div"] if div else None)

    def step(self):
        self._step(self.next(), False)

    def step_div(self):
        self._step(self.next(), True)

    def round(self):
        s = self.next()
        ops.flatten(s["params"], out=s["flat"], align=self.align)
        self._step(s, False)

    def kernels(self):
        return {"pack": self.pack, "avg": self.avg, "avg+step": self.step,
                "avg+step+div": self.step_div, "round": self.round}


def copy_workload(numel, device, gen):
    pairs = [(torch.randn(numel, device=device, generator=gen), torch.empty(numel, device=device))
             for _ in range(2)]
    state = {"i": 0}

    def fn():
        src, dst = pairs[state["i"]]
        state["i"] ^= 1
        dst.copy_(src)
    return fn, pairs


def gbs(bytes_per_elem, numel, t):
    return bytes_per_elem * numel / t / 1e9


# --------------------------------------------------------------------------- part: kernels


def part_kernels(args):
    dev = args.device
    timer = Timer(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    default = default_config()
    print(f"launch configurations (persistent, split_log2, unroll): default {default}; "
          f"settable: {has_launch_config()}")
    results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
               "torch": torch.__version__, "default_config": default, "models": {}}
    calls, rounds = args.calls, args.rounds
    # The copy ceiling: 1 GiB fp32 copy_ (2 GiB moved), and one of ResNet-50's size.
    big = 2**16 if args.small else 2**28
    ceilings = {}
    for label, numel in (("copy 1GiB", big), ("copy resnet50-size", 25_557_032 if not args.small else 2**14)):
        fn, keep = copy_workload(numel, dev, gen)
        r = measure(timer, {label: (fn, None)}, calls, rounds)[label]
        ceilings[label] = {k: dict(v, gbs=gbs(8, numel, v["median"])) for k, v in r.items()}
        del keep, fn
    results["ceilings"] = ceilings
    # The higher of the two timings: a ceiling measured too low (graph replay of copy_ ran at
    # 2.8 TB/s against 4.2 TB/s with events on the H200, 2026-12-04) would flatter every kernel.
    ceil = max(v["gbs"] for v in ceilings["copy 1GiB"].values())
    print(f"copy_ ceiling, 1 GiB fp32, read+write: events "
          f"{ceilings['copy 1GiB']['events']['gbs']:.0f} GB/s, graph "
          f"{ceilings['copy 1GiB'].get('graph', {}).get('gbs', float('nan')):.0f} GB/s")
    results["ceiling_gbs"] = ceil

    for model in args.models.split(","):
        shapes = model_shapes(model, args.small)
        mres = results["models"][model] = {"tensors": len(shapes)}
        for align in (PADDED, 1):
            layout = "padded" if align == PADDED else "packed"
            w = Workload(shapes, dev, align, gen)
            mres["numel"] = w.numel
            ks = w.kernels()
            if align != PADDED:  # packed: the two kernels the layout changes
                ks = {k: ks[k] for k in ("pack", "avg+step")}
            variants = {}
            for k, fn in ks.items():
                variants[f"{k}|default"] = (fn, default)
                if default is not None and k in ("pack", "avg+step", "avg+step+div", "round"):
                    variants[f"{k}|before"] = (fn, CONFIGS["before"])
            r = measure(timer, variants, calls, rounds, host=(model == "resnet50" and align == PADDED))
            for name, v in r.items():
                k, cfg = name.split("|")
                for how, st in v.items():
                    st["gbs"] = gbs(BYTES[k], w.numel, st["median"])
                    st["pct_copy"] = 100 * st["gbs"] / ceil
                mres.setdefault(layout, {})[name] = v
            if args.sweep and default is not None and align == PADDED:
                sweep = {}
                for cname, cfg in CONFIGS.items():
                    for k in ("pack", "avg+step"):
                        sweep[f"{k}|{cname}"] = (ks[k], cfg)
                r = measure(timer, sweep, calls, rounds, graphs=not args.no_sweep_graphs)
                for name, v in r.items():
                    k = name.split("|")[0]
                    for st in v.values():
                        st["gbs"] = gbs(BYTES[k], w.numel, st["median"])
                        st["pct_copy"] = 100 * st["gbs"] / ceil
                mres["sweep"] = r
            del w, ks, variants
            if dev == "cuda":
                torch.cuda.empty_cache()
        print_model(model, mres, ceil)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print_summary(results)


def fmt(st):
    return f"{st['median'] * 1e3:8.3f} [{st['min'] * 1e3:.3f}-{st['max'] * 1e3:.3f}]"


def print_model(model, mres, ceil):
    print(f"\n== {model}: {mres['numel']:,} fp32 params in {mres['tensors']} tensors; "
          f"ms per call: median [min-max] over rounds; GB/s and % of the 1 GiB copy ceiling "
          f"({ceil:.0f} GB/s) from the graph median (events where no graph)")
    for layout in ("padded", "packed"):
        for name, v in mres.get(layout, {}).items():
            k = name.split("|")[0]
            best = v.get("graph", v["events"])
            host = f"  host {v['host']['median'] * 1e3:.3f}" if "host" in v else ""
            print(f"  {layout:6} {name:24} {BYTES[k]:2d} B/el | events {fmt(v['events'])} | "
                  f"graph {fmt(v['graph']) if 'graph' in v else '-':>28} | "
                  f"{best['gbs']:7.0f} GB/s {best['pct_copy']:5.1f}%{host}")
    if "sweep" in mres:
        print(f"  launch configurations (persistent, split_log2, unroll), padded layout:")
        for name, v in mres["sweep"].items():
            k, cname = name.split("|")
            best = v.get("graph", v["events"])
            print(f"    {k:9} {cname:22} {str(CONFIGS[cname]):10} | events {fmt(v['events'])} | "
                  f"{best['gbs']:7.0f} GB/s {best['pct_copy']:5.1f}%")


def print_summary(results):
    ceil = results["ceiling_gbs"]
    print(f"\nSUMMARY bench_gpu_round kernels: copy ceiling {ceil:.0f} GB/s (1 GiB, best of events and graph); "
          f"default config {results['default_config']}")
    print(f"{'model':11} {'kernel':13} {'layout':6} | {'default ms':>10} {'%copy':>6} | "
          f"{'before ms':>9} {'%copy':>6} | best of sweep")
    for model, m in results["models"].items():
        for layout in ("padded", "packed"):
            for name, v in m.get(layout, {}).items():
                k, cfg = name.split("|")
                if cfg != "default" or k not in ("pack", "avg+step", "avg+step+div", "round"):
                    continue
                d = v.get("graph", v["events"])
                b = m[layout].get(f"{k}|before")
                bs = b.get("graph", b["events"]) if b else None
                best = ""
                if layout == "padded" and "sweep" in m and k in ("pack", "avg+step"):
                    cands = [(sv.get("graph", sv["events"])["median"], n.split("|")[1])
                             for n, sv in m["sweep"].items() if n.startswith(k + "|")]
                    t, n = min(cands)
                    best = f"{n} {t * 1e3:.3f} ms"
                print(f"{model:11} {k:13} {layout:6} | {d['median'] * 1e3:10.3f} "
                      f"{d['pct_copy']:5.1f}% | "
                      + (f"{bs['median'] * 1e3:9.3f} {bs['pct_copy']:5.1f}%" if bs else f"{'-':>9} {'':6}")
                      + f" | {best}")


# --------------------------------------------------------------------------- part: profile


def part_profile(args):
    """Few launches for ncu: per model, pack and avg+step under the default and the 'before'
    configuration, and avg+step+div under the default (5 multi_segment_kernel launches and
    one add_block_sums_kernel per model). No warm-up of these kernels: ncu replays each one."""
    dev = args.device
    gen = torch.Generator(device=dev).manual_seed(0)
    default = default_config()
    plan = [("pack", default), ("avg+step", default), ("avg+step+div", default),
            ("pack", CONFIGS["before"]), ("avg+step", CONFIGS["before"])]
    for model in args.models.split(","):
        w = Workload(model_shapes(model, args.small), dev, PADDED, gen, sets=1)
        ks = w.kernels()
        print(f"profile {model}: launches in order: "
              + ", ".join(f"{k} {cfg}" for k, cfg in plan))
        if args.torch_profiler and dev == "cuda":
            from torch.profiler import ProfilerActivity, profile
            for k, cfg in plan:  # warm-up outside the profile
                set_config(cfg)
                ks[k]()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.rounds):
                    for k, cfg in plan:
                        set_config(cfg)
                        ks[k]()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15,
                                            max_name_column_width=90))
        else:
            for k, cfg in plan:
                set_config(cfg)
                ks[k]()
            if dev == "cuda":
                torch.cuda.synchronize()
        set_config(default)
        del w, ks


# --------------------------------------------------------------------------- part: e2e


def part_e2e(args):
    import prsgd_hvd as hvd

    dev = args.device
    hvd.init()
    assert hvd.size() == 1, "run with one process (no horovodrun)"
    timer = Timer(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = model_shapes("resnet50", args.small)
    numel = sum(torch.Size(s).numel() for s in shapes)
    init = [torch.randn(s, device=dev, generator=gen) for s in shapes]
    grads = [torch.randn(s, device=dev, generator=gen) * 1e-2 for s in shapes]

    def make(kind):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        kw = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        if kind == "torch SGD fused=True":
            opt = torch.optim.SGD(params, fused=True, **kw)
        elif kind == "torch SGD foreach=True":
            opt = torch.optim.SGD(params, foreach=True, **kw)
        else:
            opt = torch.optim.SGD(params, **kw)
            extra = {} if kind.endswith("defaults") else dict(overlap=False, nonfinite="ignore")
            opt = hvd.DistributedLocalSGD(opt, interval=1, fused=True, **extra)
        return opt, params

    kinds = ["torch SGD fused=True", "torch SGD foreach=True",
             "DistributedLocalSGD(I=1) defaults",
             "DistributedLocalSGD(I=1) overlap=False nonfinite=ignore"]
    opts = {k: make(k) for k in kinds}
    variants = {k: (opts[k][0].step, None) for k in kinds}
    for k in kinds:  # first steps: momentum buffers, the first round's agreement
        for _ in range(3):
            opts[k][0].step()
    timer.sync()
    r = measure(timer, variants, args.calls, args.rounds, graphs=False)
    # Device time per step: the kernels alone (a step may wait on the host in between).
    device_ms = {}
    if dev == "cuda":
        from torch.profiler import ProfilerActivity, profile
        for k in kinds:
            steps = 5
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    opts[k][0].step()
                torch.cuda.synchronize()
            evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            # A kernel's own event: its time range is the kernel's run on the device.
            total_us = sum(e.time_range.elapsed_us() for e in evs)
            device_ms[k] = (total_us / 1e3 / steps, len(evs) / steps)
    # The bandwidth to price the extra bytes at: a copy of this size, the same way.
    fn, keep = copy_workload(numel, dev, gen)
    c = measure(timer, {"copy": (fn, None)}, args.calls, args.rounds, graphs=False)["copy"]
    bw = gbs(8, numel, c["events"]["median"]) * 1e9
    del keep
    t_fused = r["torch SGD fused=True"]["events"]["median"]
    extra_bytes = {"DistributedLocalSGD(I=1) defaults": 8 + 4,  # pack 8, the non-finite sum 4
                   "DistributedLocalSGD(I=1) overlap=False nonfinite=ignore": 8}
    print(f"\nSUMMARY e2e: 1 rank, ResNet-50-sized params ({numel:,} in {len(shapes)} tensors), "
          f"SGD momentum {MOMENTUM} wd {WEIGHT_DECAY}; ms per step (events over {args.calls} "
          f"back-to-back steps, median [min-max] of {args.rounds}); copy bandwidth "
          f"{bw / 1e9:.0f} GB/s")
    print(f"{'variant':55} {'step ms':>28} | {'kernels ms':>10} {'launches':>8} | verdict")
    out = {"numel": numel, "copy_gbs": bw / 1e9, "variants": {}}
    for k in kinds:
        st = r[k]["events"]
        dm, dl = device_ms.get(k, (float("nan"), float("nan")))
        verdict = ""
        if k in extra_bytes:
            allowed = t_fused + extra_bytes[k] * numel / bw
            verdict = (f"{'OK' if st['median'] <= allowed else 'OVER'}: <= fused + "
                       f"{extra_bytes[k]} B/el = {allowed * 1e3:.3f} ms")
            dev_allowed = device_ms.get("torch SGD fused=True", (float("nan"),))[0] + \
                extra_bytes[k] * numel / bw * 1e3
            verdict += f"; kernels {'OK' if dm <= dev_allowed else 'OVER'} (<= {dev_allowed:.3f})"
        print(f"{k:55} {fmt(st):>28} | {dm:10.3f} {dl:8.1f} | {verdict}")
        out["variants"][k] = {"step": st, "kernels_ms": dm, "launches": dl, "verdict": verdict}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


# --------------------------------------------------------------------------- part: check


def part_check(args):
    """The extension loads and a flatten round-trips on the device (gpu_check's build step)."""
    assert ops.has_extension(), ops.extension_error()
    x = torch.randn(1000, device=args.device)
    assert torch.equal(ops.flatten([x[:3], x[3:]]), x)
    print(f"kernels load and run on {args.device}; launch configuration "
          f"{torch.ops.prsgd_hvd_cuda.launch_config() if has_launch_config() else None}")


# --------------------------------------------------------------------------- part: ncu-summary

NCU_KEYS = {  # details-page metric name -> column
    "Duration": "dur", "DRAM Throughput": "dram%", "Memory Throughput": "mem%",
    "Achieved Occupancy": "occ%", "Theoretical Occupancy": "theo%",
    "Registers Per Thread": "regs", "Grid Size": "grid", "Waves Per SM": "waves",
    "dram__bytes_read.sum": "rd", "dram__bytes_write.sum": "wr",
}
_UNITS = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "us": 1e-6, "ms": 1e-3,
          "ns": 1e-9, "s": 1.0, "usecond": 1e-6, "msecond": 1e-3, "nsecond": 1e-9}


def parse_ncu_details(text):
    """Kernels of an `ncu --page details` report: [(name, grid, {column: value})]."""
    import re
    kernels = []
    head = re.compile(r"^\s*(\S.*?) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\), "
                      r"(?:Context|Device)")
    metric = re.compile(r"^\s+(\S(?:.*?\S)?)\s{2,}(?:(\S+)\s+)?([-\d][\d,.]*)\s*$")
    for line in text.splitlines():
        m = head.match(line)
        if m:
            kernels.append((m.group(1), int(m.group(2)), {}))
            continue
        m = metric.match(line)
        if m and kernels and m.group(1) in NCU_KEYS:
            value = float(m.group(3).replace(",", ""))
            unit = m.group(2) or ""
            kernels[-1][2][NCU_KEYS[m.group(1)]] = value * _UNITS.get(unit, 1.0)
    return kernels


def part_ncu_summary(args):
    with open(args.input) as f:
        kernels = parse_ncu_details(f.read())
    numel = args.numel
    print(f"SUMMARY ncu (--clock-control none), {len(kernels)} kernels, in launch order; "
          f"B/el = DRAM bytes read+written / {numel:,} elements")
    print(f"{'kernel':58} {'grid':>6} {'us':>8} {'DRAM%':>6} {'occ%':>5} {'theo%':>5} "
          f"{'regs':>4} {'waves':>6} {'rd B/el':>7} {'wr B/el':>7}")
    for name, grid, m in kernels:
        short = name.replace("prsgd::cuda::", "").replace("(anonymous namespace)::", "")
        short = short.replace("multi_segment_kernel", "msk").replace("void ", "")
        short = short.split("(")[0][:58]

        def g(k, fmt="{:.1f}", scale=1.0):
            return fmt.format(m[k] * scale) if k in m else "-"
        print(f"{short:58} {grid:>6} {g('dur', '{:.1f}', 1e6):>8} {g('dram%'):>6} "
              f"{g('occ%'):>5} {g('theo%'):>5} {g('regs', '{:.0f}'):>4} {g('waves', '{:.2f}'):>6} "
              f"{g('rd', '{:.2f}', 1 / numel):>7} {g('wr', '{:.2f}', 1 / numel):>7}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["kernels", "profile", "e2e", "ncu-summary", "check"],
                    default="kernels")
    ap.add_argument("--input", help="ncu-summary: an `ncu --page details` text report")
    ap.add_argument("--numel", type=int, default=25_557_032,
                    help="ncu-summary: elements per kernel (default ResNet-50's)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--models", default="resnet50,flat1g,flat1g_300")
    ap.add_argument("--calls", type=int, default=10, help="back-to-back calls per timing")
    ap.add_argument("--rounds", type=int, default=9, help="timings per variant (interleaved)")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false",
                    help="skip the launch-configuration sweep")
    ap.add_argument("--no-sweep-graphs", action="store_true", help="sweep with events only")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a code-path check")
    ap.add_argument("--torch-profiler", action="store_true", help="profile part: torch.profiler")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--exercise-configs", action="store_true",
                    help="without the CUDA build: run the configuration code paths anyway "
                         "(every configuration is then the same kernel; a code check only)")
    args = ap.parse_args()
    _EXERCISE[0] = args.exercise_configs
    if args.part == "ncu-summary":
        return part_ncu_summary(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    print(f"torch {torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, "
          f"extension loaded: {ops.has_extension()}", flush=True)
    {"kernels": part_kernels, "profile": part_profile, "e2e": part_e2e,
     "check": part_check}[args.part](args)


if __name__ == "__main__":
    main()
