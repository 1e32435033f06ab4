"""Launch worker scripts under a real ``horovodrun --gloo`` and collect what each rank saved.

Workers get ``--out DIR`` and save ``DIR/rank{r}.pt`` (anything ``torch.save`` takes). A run that
exits non-zero or outlives ``timeout`` fails the test with the tail of its output; on timeout the
whole process group is killed, so a hang fails a test instead of stalling CI.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"


def horovodrun_path() -> str:
    exe = Path(sys.executable).parent / "horovodrun"
    return str(exe) if exe.exists() else "horovodrun"


class HorovodRunError(AssertionError):
    def __init__(self, msg: str, output: str, returncode: Optional[int]):
        super().__init__(msg)
        self.output = output
        self.returncode = returncode


def run_command(cmd: Sequence[str], timeout: float, env: Optional[dict] = None,
                cwd: Optional[str] = None, what: str = "job"):
    """Run ``cmd`` (a horovodrun command line) with the test environment; returns
    (returncode, combined output). On timeout the whole process group is killed."""
    full_env = dict(os.environ)
    # 2 cores, several ranks: one intra-op thread each, or they fight over the cores.
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(WORKERS)] + [p for p in [full_env.get("PYTHONPATH")] if p])
    full_env.update(env or {})
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd or str(REPO), env=full_env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise HorovodRunError(f"{what} did not finish in {timeout} s:\n{output[-6000:]}",
                              output, None)
    return proc.returncode, output


def horovodrun_command(np: int, script: Path, args: Sequence[str] = (),
                       extra_horovodrun_args: Sequence[str] = (), hosts: Optional[str] = None):
    return [horovodrun_path(), "-np", str(np), "-H", hosts or f"localhost:{np}", "--gloo",
            *extra_horovodrun_args, sys.executable, str(script), *args]


def launch(script: str, np: int, args: Sequence[str] = (), timeout: float = 240,
           env: Optional[dict] = None, extra_horovodrun_args: Sequence[str] = (),
           cluster=None, slots: int = 1):
    """Run tests/workers/``script`` on ``np`` ranks; returns (returncode, output, out_dir).

    With ``cluster`` (tests/cluster_hosts.py), the ranks run on its hosts, ``slots`` per host,
    launched over ssh from host1."""
    out_dir = tempfile.mkdtemp(prefix="prsgd_hvd_test_")
    hosts = None
    if cluster is not None:
        from cluster_hosts import launcher_env
        hosts = cluster.hosts_arg(slots, range(1, np // slots + 1))
        extra_horovodrun_args = ["--network-interface", "eth0", *extra_horovodrun_args]
        env = {**launcher_env(cluster), **(env or {})}
    cmd = horovodrun_command(np, WORKERS / script, ["--out", out_dir, *args], extra_horovodrun_args,
                             hosts)
    if cluster is not None:
        cmd = cluster.exec_argv(1, cmd)
    rc, output = run_command(cmd, timeout, env, what=f"{script} on {np} ranks")
    return rc, output, out_dir


def run_workers(script: str, np: int, args: Sequence[str] = (), timeout: float = 240,
                env: Optional[dict] = None, cluster=None, slots: int = 1) -> List[dict]:
    """Run ``script`` on ``np`` ranks and return each rank's saved results, rank order."""
    rc, output, out_dir = launch(script, np, args, timeout, env, cluster=cluster, slots=slots)
    if rc != 0:
        raise HorovodRunError(f"{script} on {np} ranks exited with {rc}:\n{output[-6000:]}",
                              output, rc)
    results = []
    for r in range(np):
        path = Path(out_dir) / f"rank{r}.pt"
        if not path.exists():
            raise HorovodRunError(f"rank {r} saved no results:\n{output[-6000:]}", output, rc)
        results.append(torch.load(path, weights_only=False))
    return results
