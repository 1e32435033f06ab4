"""Hosts on one machine for tests: a module fixture around scripts/cluster.py's ``Cluster``.

Tests that need hosts skip, saying why, where a cluster cannot be made (not root, no ``ip``,
no openssh-server: ``make setup-cluster`` installs it; CI's ``make test`` does). ``down`` runs in
a ``finally``, so a failing test leaves no namespace, sshd or worker behind.
"""
from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from cluster import Cluster, missing_requirements  # noqa: E402


@contextmanager
def cluster_or_skip(n: int, rate=None, name: str = "prsgdtest"):
    why = missing_requirements()
    if why:
        pytest.skip(f"hosts on one machine: {why}")
    with Cluster(n, rate, name) as c:   # down() in a finally, also on SIGTERM
        yield c


def launcher_env(cluster: Cluster) -> dict:
    """What a horovodrun launcher on host1 needs on top of the test environment."""
    env = cluster.env(base={"PATH": os.environ.get("PATH", "")},
                      venv_bin=str(Path(sys.executable).parent))
    return {"PATH": env["PATH"], "HOME": env["HOME"]}


def pids_running(cluster: Cluster, host: int, needle: str) -> List[int]:
    """PIDs on ``host`` whose command line contains ``needle``."""
    found = []
    for pid in cluster.pids(host):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline and "ssh" not in cmdline.split()[0] and not cmdline.startswith(
                ("bash", "sh ", "/bin/sh", "/bin/bash")):
            found.append(pid)
    return found


def kill(pids: List[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
