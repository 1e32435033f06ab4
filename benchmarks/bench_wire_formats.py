"""What a delta wire format costs on one host: encode and decode time per MB of fp32 model.

For each ``compression=`` format (fp16, bf16, "int8") one bucket of ``--numel`` fp32 elements
(the default is the cluster benchmark's 6.32M-parameter MLP) on ``--ranks`` simulated ranks:

  encode  WireFormat.messages(): delta from the anchor, error feedback, the cast / quantisation
          (one rank's work before its collective starts)
  decode  WireFormat.decode(): what arrives -> the flat sum on the anchor (fp16: the one
          summed tensor Horovod's allreduce returns; bf16 and int8: every rank's message,
          gathered)

The collective itself is not timed (docs/cluster.md measures the link). Also printed: bytes
each rank hands to the collective per element. Medians over --repeats after warm-up; the
formats are interleaved so that a busy machine slows them alike.

    python benchmarks/bench_wire_formats.py --threads 2 --repeats 10
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from prsgd_hvd.anchor import Anchor
from prsgd_hvd.averaging import CONTROL_FIELDS, BucketLayout, Round, RoundId
from prsgd_hvd.wire_formats import for_option

FORMATS = ("fp16", "bf16", "int8")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Setup:
    """One format on one simulated rank, with the messages of all ranks ready to decode."""

    def __init__(self, kind, numel, ranks, device, gen):
        self.layout = BucketLayout([torch.zeros(numel, device=device)], ranks)
        self.bucket = self.layout.buckets[0]
        self.ranks = ranks
        self.anchor = Anchor(kept=True)
        self.bucket.payload.copy_(torch.randn(numel, generator=gen).to(device))
        record = (1.0,) + (0.0,) * (CONTROL_FIELDS - 1)
        self.anchor.follow(Round(self.layout, RoundId("scheduled", 1), [record],
                                 anchor=self.anchor))
        self.x = self.anchor.bucket(0) + 1e-2 * torch.randn(numel, generator=gen).to(device)
        self.fmt = for_option(kind)
        self.kind = kind
        msg = self.encode()[0].tensor.clone()
        self.received = [msg if kind == "fp16" else torch.cat([msg] * ranks)]
        self.sent_bytes = msg.numel() * msg.element_size()

    def encode(self):
        self.bucket.payload.copy_(self.x)  # the pack, not timed
        return self.fmt.messages(self.bucket, 1.0, True, self.anchor)

    def decode(self):
        self.fmt.decode(self.bucket, self.received, self.ranks, float(self.ranks), self.anchor)


def median_ms(fn, prepare, device, repeats, warmup=2):
    times = []
    for i in range(warmup + repeats):
        prepare()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--numel", type=int, default=6_320_000)
    ap.add_argument("--ranks", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    setups = {k: Setup(k, args.numel, args.ranks, device, gen) for k in FORMATS}
    enc = {k: [] for k in FORMATS}
    dec = {k: [] for k in FORMATS}
    for _ in range(args.repeats):  # interleaved: one sample of each format per pass
        for k, s in setups.items():
            enc[k].append(median_ms(s.encode, lambda: None, device, 1, warmup=0))
            dec[k].append(median_ms(s.decode, lambda: None, device, 1, warmup=0))
    mb = args.numel * 4 / 1e6
    print(f"{args.numel / 1e6:.2f}M fp32 elements ({mb:.1f} MB), {args.ranks} ranks, "
          f"{args.device}, {args.threads} threads, medians of {args.repeats}")
    # Ratios against fp16, the format measured beside it in the same interleaved passes.
    base_e, base_d = statistics.median(enc["fp16"]), statistics.median(dec["fp16"])
    print(f"{'format':<7} {'B/elem sent':>11} {'encode ms':>10} {'ms/MB':>7} {'vs fp16':>8} "
          f"{'decode ms':>10} {'ms/MB':>7} {'vs fp16':>8}")
    for k, s in setups.items():
        e, d = statistics.median(enc[k]), statistics.median(dec[k])
        print(f"{k:<7} {s.sent_bytes / args.numel:>11.3f} {e:>10.2f} {e / mb:>7.3f} "
              f"{e / base_e:>7.2f}x {d:>10.2f} {d / mb:>7.3f} {d / base_d:>7.2f}x")


if __name__ == "__main__":
    main()
