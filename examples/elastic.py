"""Elastic local SGD: workers may leave and join; training resumes from the last commit.

    horovodrun -np 2 --min-np 1 --max-np 3 \
        --host-discovery-script examples/discover_hosts.sh python examples/elastic.py

`discover_hosts.sh` prints the hosts and slots available now (here: localhost, with the slot
count read from $PRSGD_SLOTS_FILE if set, so a test can grow and shrink the job). When a
worker fails or the host list changes, Horovod re-initialises, LocalSGDState restores the
last commit (model, optimizer state, local-SGD counters and schedule position) and brings
every worker -- new ones too -- to rank 0's model and schedule.
"""
import argparse
import os
import socket
import time

import torch
from torch import nn

import prsgd_hvd as hvd



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--interval", type=int, default=4)
    ap.add_argument("--delay", type=int, default=0, help="streaming rounds: merge tau steps later")
    ap.add_argument("--fragments", type=int, default=1, help="streaming rounds: F fragments")
    ap.add_argument("--outer-lr", type=float, default=None,
                    help="an outer optimizer (DiLoCo): SGD with this lr and Nesterov momentum")
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--step-ms", type=float, default=20.0, help="extra time per step (to watch)")
    ap.add_argument("--record", default=None, help="append 'size step rounds' lines here (rank 0)")
    ap.add_argument("--state", choices=["localsgd", "torch"], default="localsgd",
                    help="hvd.elastic.LocalSGDState, or Horovod's own hvd.elastic.TorchState "
                         "(which handles a wrapped optimizer once prsgd_hvd is imported)")
    ap.add_argument("--out", default=None,
                    help="each worker writes OUT/<hostname>.rank (its rank, at every (re)start), "
                         "saves what it (re)starts from to OUT/start-<host>-<pid>-<n>.pt and its "
                         "host, counters and final model to OUT/rank{r}.pt")
    args = ap.parse_args()

    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    # theta0 and the outer momentum travel with the commit: a joining worker receives rank 0's.
    outer = None if args.outer_lr is None else hvd.outer.diloco(args.outer_lr, args.outer_momentum)
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                  interval=args.interval, delay=args.delay,
                                  fragments=args.fragments, outer=outer)
    state_class = hvd.elastic.LocalSGDState if args.state == "localsgd" else hvd.elastic.TorchState
    state = state_class(model, opt, step=0)
    starts = []

    @hvd.elastic.run
    def train(state):
        last_rounds = opt.rounds
        if args.out:  # which rank each host's worker has now (elastic ranks need not follow hosts)
            with open(os.path.join(args.out, f"{socket.gethostname()}.rank"), "w") as f:
                f.write(str(hvd.rank()))
            # What this worker (re)starts from, for tests that hold each phase to a reference.
            starts.append(state.step)
            with opt.per_rank_checkpoint():  # streamed rounds in flight (their corrections)
                local = opt.state_dict()["local_sgd"]
            torch.save({"in_flight": local.get("in_flight", []), "outer": local.get("outer"), "host": socket.gethostname(), "pid": os.getpid(), "rank": hvd.rank(),
                        "size": hvd.size(), "step": state.step, "local_step": opt.local_step,
                        "params": [p.detach().clone() for p in model.parameters()],
                        "momentum": [opt.state[p].get("momentum_buffer") for p in model.parameters()]},
                       os.path.join(args.out, f"start-{socket.gethostname()}-{os.getpid()}-"
                                              f"{len(starts)}.pt"))
        while state.step < args.steps:
            g = torch.Generator().manual_seed(1000 * hvd.rank() + state.step)
            x = torch.randn(32, 16, generator=g)
            y = x[:, :1].sin()
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            time.sleep(args.step_ms / 1000)
            state.step += 1
            if opt.rounds > last_rounds:  # commit right after a round: models are close
                last_rounds = opt.rounds
                # Recorded before commit(): commit() saves, then raises HostsUpdatedInterrupt
                # when the hosts changed, and the job resumes from that commit.
                if hvd.rank() == 0 and args.record:
                    with open(args.record, "a") as f:
                        f.write(f"{hvd.size()} {state.step} {opt.rounds}\n")
                state.commit()

    train(state)
    counters = {"step": state.step, "local_step": opt.local_step, "rounds": opt.rounds}
    opt.finalize()
    # Every worker, the one that joined too, must end on the same schedule and world size.
    seen = hvd.allgather_object((opt.local_step, opt.rounds, opt.stats()["world_size"]),
                                name="elastic.counters")
    if args.out:
        torch.save({"host": socket.gethostname(), "rank": hvd.rank(), "size": hvd.size(),
                    **counters, "params": [p.detach().clone() for p in model.parameters()]},
                   os.path.join(args.out, f"rank{hvd.rank()}.pt"))
    if hvd.rank() == 0:
        print(f"done: {state.step} steps, {opt.rounds} rounds, final size {hvd.size()}", flush=True)
        print(f"counters agree: {len(set(seen)) == 1} {seen}", flush=True)


if __name__ == "__main__":
    main()
