"""Averaging rounds show up in Horovod's timeline as named activities."""
import json
import os
import tempfile

from hvdrun import run_workers


def test_rounds_are_named_in_the_horovod_timeline():
    path = os.path.join(tempfile.mkdtemp(prefix="prsgd_timeline_"), "timeline.json")
    stats = run_workers("timeline_worker.py", 2, env={"HOROVOD_TIMELINE": path}, timeout=120)
    assert stats[0]["rounds"] == 4  # t = 2, 4, 6 and finalize()
    text = open(path).read()
    # The file is a JSON array Horovod may leave unterminated; parse event by event.
    events = json.loads(text.rstrip().rstrip(",") + ("]" if not text.rstrip().endswith("]") else ""))
    names = {e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M"}
    # Rounds are named by what they average: prsgd_hvd.<checksum of the parameters>.bucket<i>.
    averaging = [n for n in names if n.startswith("allreduce.prsgd_hvd.") and n.endswith(".bucket0")]
    assert averaging, f"no averaging activity in the timeline; names: {sorted(names)[:20]}"
    pid = next(e["pid"] for e in events if e.get("ph") == "M" and e["args"].get("name") == averaging[0])
    rounds = [e for e in events if e.get("pid") == pid and e.get("ph") == "B" and e.get("name") == "ALLREDUCE"]
    assert len(rounds) == 4, f"each round is one named allreduce activity, got {len(rounds)}"
