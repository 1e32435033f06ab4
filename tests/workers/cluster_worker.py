"""trajectory_worker's scenarios on ranks spread over hosts, plus where each rank ran.

Usage (under horovodrun across hosts): cluster_worker.py --out DIR --scenarios JSON
Saves what trajectory_worker saves, and under "_topology" this rank's hostname and Horovod's
local/cross ranks and sizes, so a test can tell that the ranks really were on different hosts.
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
    results = {spec["name"]: run(spec, hvd.rank()) for spec in json.loads(args.scenarios)}
    results["_topology"] = {"hostname": socket.gethostname(), "rank": hvd.rank(),
                            "local_rank": hvd.local_rank(), "local_size": hvd.local_size(),
                            "cross_rank": hvd.cross_rank(), "cross_size": hvd.cross_size()}
    torch.save(results, f"{args.out}/rank{hvd.rank()}.pt")
    hvd.allreduce(torch.zeros(1), name="cluster_worker.done")   # leave together (process sets)


if __name__ == "__main__":
    main()
