"""Run a script from examples/ (or anywhere) under a real ``horovodrun --gloo``.

``hvdrun.launch`` runs scripts under tests/workers with ``--out``; this runs any script with the
same environment and the same kill-on-timeout (``hvdrun.run_command``).
"""
from __future__ import annotations

from typing import Optional, Sequence

from hvdrun import REPO, HorovodRunError, horovodrun_command, run_command


def run_example(script: str, np: int, args: Sequence[str] = (), timeout: float = 120,
                cwd: Optional[str] = None, env: Optional[dict] = None) -> str:
    """Run ``REPO/script`` on ``np`` ranks; return its combined output, fail on error/timeout."""
    what = f"{script} on {np} ranks"
    rc, output = run_command(horovodrun_command(np, REPO / script, args), timeout, env, cwd, what)
    if rc != 0:
        raise HorovodRunError(f"{what} exited with {rc}:\n{output[-6000:]}", output, rc)
    return output


def rank0_lines(output: str):
    """Rank 0's stdout lines, without horovodrun's ``[0]<stdout>:`` prefix."""
    prefix = "[0]<stdout>:"
    return [line[len(prefix):] for line in output.splitlines() if line.startswith(prefix)]
