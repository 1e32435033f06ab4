"""Run a script from examples/ (or anywhere) under a real ``horovodrun --gloo``.

The same pattern as ``hvdrun.launch`` (which only runs scripts under tests/workers): one intra-op
thread per rank, the repository on PYTHONPATH, and the whole process group killed on timeout so
a hang fails the test instead of stalling CI.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from hvdrun import REPO, HorovodRunError, horovodrun_path


def run_example(script: str, np: int, args: Sequence[str] = (), timeout: float = 120,
                cwd: Optional[str] = None, env: Optional[dict] = None) -> str:
    """Run ``REPO/script`` on ``np`` ranks; return its combined output, fail on error/timeout."""
    cmd = [horovodrun_path(), "-np", str(np), "-H", f"localhost:{np}", "--gloo",
           sys.executable, str(REPO / script), *args]
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in [full_env.get("PYTHONPATH")] if p])
    full_env.update(env or {})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd or str(REPO), env=full_env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise HorovodRunError(f"{script} on {np} ranks did not finish in {timeout} s:\n"
                              f"{output[-6000:]}", output, None)
    if proc.returncode != 0:
        raise HorovodRunError(f"{script} on {np} ranks exited with {proc.returncode}:\n"
                              f"{output[-6000:]}", output, proc.returncode)
    return output


def rank0_lines(output: str):
    """Rank 0's stdout lines, without horovodrun's ``[0]<stdout>:`` prefix."""
    prefix = "[0]<stdout>:"
    return [line[len(prefix):] for line in output.splitlines() if line.startswith(prefix)]
