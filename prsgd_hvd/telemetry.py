"""``optimizer.stats()``: the counters and what the rounds measured, in one dict."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

if TYPE_CHECKING:  # pragma: no cover
    from .local_sgd import LocalSGD


def stats(ls: "LocalSGD") -> Dict[str, Any]:
    total = ls.world.total
    return {
        "local_step": ls.local_step,
        "rounds": ls.rounds,
        "bytes_sent": total("bytes_sent"),
        "comm_seconds": total("comm_seconds"),
        "exposed_comm_seconds": total("wait_seconds"),
        # ||x_i - x_avg||^2 over the parameters at the last round, measured inside the
        # write-back pass: the quantity the paper's lemma bounds by 4 gamma^2 I^2 G^2.
        "divergence": ls.divergence,
        "fused": ls.write_stage.fused is not None,
        # outer=torch.optim.SGD: the outer rounds the fused kernel wrote (prsgd_hvd.fused_outer),
        # and of those, the ones where it applied the inner SGD update too.
        "fused_outer_rounds": getattr(ls.write_stage.outer, "fused_rounds", 0),
        "fused_outer_updates": getattr(ls.write_stage.outer, "fused_updates", 0),
        # outer_device=: where theta0 and the outer state live (None: beside the parameters).
        "outer_device": str(ls.config.outer_device) if ls.config.outer_device is not None else None,
        "overlap": ls.overlap,
        "compression": ls.config.compression,
        "excluded": [dict(e) for e in ls.policy.excluded],
        "schedule": repr(ls.schedule),
        "world_size": ls.size,
        # Streaming rounds (NOTE: [streaming]): the options and the rounds not merged yet.
        "delay": ls.config.delay,
        "fragments": ls.config.fragments,
        "in_flight": len(ls.streaming.in_flight) if ls.streaming is not None else 0,
        # Delayed merges written in one pass (a MergeRound, NOTE: [streaming]), and of those the
        # ones whose pass applied the step's SGD update too.
        "one_pass_merges": ls.streaming.one_pass_merges if ls.streaming is not None else 0,
        "fused_merges": ls.streaming.fused_merges if ls.streaming is not None else 0,
    }
