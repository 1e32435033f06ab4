"""trajectory_worker's scenarios on ranks spread over hosts, plus where each rank ran.

Usage (under horovodrun across hosts): cluster_worker.py --out DIR --scenarios JSON
Saves what trajectory_worker saves, and under "_topology" this rank's hostname and Horovod's
local/cross ranks and sizes, so a test can tell that the ranks really were on different hosts.
A scenario with "may_fail": true that raises (the same way on every rank, e.g. at construction)
is saved as {"error": message} and the next scenario runs, so one launch can hold it.
"""
import argparse
import json
import socket

import torch

import prsgd_hvd as hvd
from trajectory_worker import run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenarios", required=True)
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    results = {}
    for spec in json.loads(args.scenarios):
        try:
            results[spec["name"]] = run(spec, hvd.rank())
        except Exception as exc:  # noqa: BLE001 -- reported to the test, which decides
            if not spec.get("may_fail"):
                raise
            results[spec["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
    results["_topology"] = {"hostname": socket.gethostname(), "rank": hvd.rank(),
                            "local_rank": hvd.local_rank(), "local_size": hvd.local_size(),
                            "cross_rank": hvd.cross_rank(), "cross_size": hvd.cross_size()}
    torch.save(results, f"{args.out}/rank{hvd.rank()}.pt")
    hvd.allreduce(torch.zeros(1), name="cluster_worker.done")   # leave together (process sets)


if __name__ == "__main__":
    main()
