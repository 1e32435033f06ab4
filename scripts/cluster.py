#!/usr/bin/env python3
"""A small cluster on one machine: N hosts as network namespaces on a bridge, each with its own
address, hostname and sshd, and a ``tbf`` rate limit on both ends of every link, so that
``horovodrun -H host1:1,host2:1,...`` launches over ssh exactly as on a real cluster.

    scripts/cluster.sh up N [RATE]      # RATE: 100mbit, 1gbit, ... or none (default: none)
    scripts/cluster.sh shape RATE|none  # change every link's rate
    scripts/cluster.sh loss P           # drop a fraction P (0.001 = 0.1%) of every host's
                                        # incoming packets at random; 0 removes the rule
    scripts/cluster.sh exec I CMD...    # run CMD on host I (1-based)
    scripts/cluster.sh hvd I CMD...     # the same with the launcher's environment (ssh wrapper,
                                        # HOME, the venv on PATH): e.g. CMD = horovodrun -H ...
    scripts/cluster.sh hosts [SLOTS]    # prints host1:SLOTS,host2:SLOTS,... for horovodrun -H
    scripts/cluster.sh status
    scripts/cluster.sh down             # removes everything ``up`` made, also after a failure

Python (tests, benchmarks): ``with Cluster(3, rate="100mbit") as c: c.run(1, [...])``.

Layout, for cluster NAME (default ``prsgd``):

* namespaces ``NAME-br`` (a bridge ``br0``) and ``NAME-h1`` .. ``NAME-hN``; host i has ``eth0``
  (every host the same name: Gloo looks the interface up by name on each host) with address
  10.213.14.i/24, and ``lo`` up. No default route anywhere: the hosts reach each other and
  their own loopback, nothing else. The /24 lives only inside these namespaces, never on the
  machine's own interfaces, so clusters with different names do not see each other.
* shaping: ``tbf`` on the host's ``eth0`` (its upload) and on the bridge's port to it (its
  download). The bucket holds about 2 ms of line rate and at least 64 KiB: smaller buckets
  fall well short of the rate (2 kB gave 117 Mbit/s of 1 Gbit/s).
* loss (optional): an nftables table ``prsgdloss`` in every host's namespace whose input hook
  counts the packets arriving on ``eth0`` and drops a random fraction of them (``numgen random``;
  a drop on the *output* hook is not loss: the sender's send fails with EPERM). Its counters
  say how many were dropped (``loss_counters()``, ``status``). Needs ``nft`` (package nftables).
  A link profile says both: ``100mbit+loss0.1%`` (``parse_profile``).
* sshd: one per host, started by absolute path under ``unshare --uts`` with the host's name
  (``ip netns exec`` alone would share the machine's hostname), with a host key, config and
  authorized key of the cluster's own; nothing under ``~/.ssh`` is read or written. Names
  resolve through ``/etc/netns/<ns>/hosts`` (bind-mounted as /etc/hosts by ``ip netns exec``).
* the launcher's environment: ``ssh`` is a wrapper first on PATH that adds ``-F <config>``
  (horovodrun runs plain ``ssh HOST ...``), and HOME points into the state directory
  (horovodrun caches its ssh check in ``~/.horovod``).

State lives in /tmp/prsgd_cluster/NAME (cluster.json says N and the rate). ``down`` does not
trust it: it sweeps every namespace called NAME-br / NAME-h<digits>, kills the processes inside
(``ip netns pids``) before deleting it, and removes /etc/netns/<ns> and the state directory.

Needs root, ``ip``/``tc`` (iproute2), ``unshare`` and openssh-server (``make setup-cluster``;
it also installs nftables, needed only for loss).
Standard library only, so it runs with any python3.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
SUBNET = "10.213.14"          # the /24 reserved for the test hosts
PREFIX_LEN = 24
SSHD = "/usr/sbin/sshd"
STATE_ROOT = Path(os.environ.get("PRSGD_CLUSTER_STATE", "/tmp/prsgd_cluster"))


class ClusterError(RuntimeError):
    pass


def _run(argv: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def missing_requirements() -> Optional[str]:
    """Why a cluster cannot be brought up here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd)"
    for tool in ("ip", "tc", "unshare", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"needs '{tool}' on PATH"
    if not os.access(SSHD, os.X_OK):
        return f"needs openssh-server ({SSHD}); run `make setup-cluster`"
    probe = f"prsgd-probe-{os.getpid()}"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"cannot create network namespaces: {made.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def _raise_system_exit(signum, frame):
    raise SystemExit(f"terminated by signal {signum}")


def rate_bits(rate: str) -> float:
    """'100mbit' -> 1e8 (tc's units: kbit, mbit, gbit; bit)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", rate.strip().lower())
    if not m:
        raise ValueError(f"rate must look like 100mbit or 1gbit, not {rate!r}")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


LOSS_TABLE = "prsgdloss"      # the nftables table (inet family) of the loss rule, one per host
LOSS_SCALE = 1_000_000        # numgen's modulus: loss fractions down to 1e-6


def parse_profile(profile: Optional[str]):
    """A link profile -> (rate or None, loss fraction): '100mbit' -> ('100mbit', 0.0),
    '100mbit+loss0.1%' -> ('100mbit', 0.001), 'none+loss1%' -> (None, 0.01), None -> (None, 0)."""
    if profile in (None, "", "none"):
        return None, 0.0
    m = re.fullmatch(r"([^+]+?)(?:\+loss(\d+(?:\.\d+)?)%)?", profile.strip().lower())
    if not m:
        raise ValueError(f"link profile must look like 100mbit, none or 100mbit+loss0.1%, "
                         f"not {profile!r}")
    rate = None if m.group(1) == "none" else m.group(1)
    if rate is not None:
        rate_bits(rate)   # validates
    loss = float(m.group(2)) / 100 if m.group(2) else 0.0
    _check_loss(loss)
    return rate, loss


def format_profile(rate: Optional[str], loss: float) -> str:
    """The inverse of parse_profile: ('100mbit', 0.001) -> '100mbit+loss0.1%'."""
    return (rate or "none") + (f"+loss{loss * 100:g}%" if loss else "")


def _check_loss(loss: float) -> None:
    if not 0.0 <= loss < 1.0:
        raise ValueError(f"loss must be a fraction in [0, 1), not {loss!r} (0.001 = 0.1%)")
    if loss and round(loss * LOSS_SCALE) == 0:
        raise ValueError(f"loss {loss!r} is below the rule's resolution 1/{LOSS_SCALE}")


class Cluster:
    """N hosts on one machine. ``up()``/``down()``, or use as a context manager."""

    def __init__(self, n: int = 3, rate: Optional[str] = None, name: str = "prsgd",
                 loss: float = 0.0):
        if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", name):
            raise ValueError("cluster name: a lowercase letter, then up to 11 letters/digits")
        if not 1 <= n <= 200:
            raise ValueError("1 <= n <= 200 hosts")
        self.n, self.rate, self.name = n, (None if rate in (None, "none") else rate), name
        _check_loss(loss)
        self.loss = loss
        self.state = STATE_ROOT / name

    # ---- names -------------------------------------------------------------------------------
    @property
    def bridge_ns(self) -> str:
        return f"{self.name}-br"

    def ns(self, i: int) -> str:
        self._check_host(i)
        return f"{self.name}-h{i}"

    @staticmethod
    def host(i: int) -> str:
        return f"host{i}"

    @staticmethod
    def addr(i: int) -> str:
        return f"{SUBNET}.{i}"

    @property
    def hosts(self) -> List[str]:
        return [self.host(i) for i in range(1, self.n + 1)]

    def hosts_arg(self, slots: int = 1, hosts: Optional[Sequence[int]] = None) -> str:
        """horovodrun's -H value: host1:slots,host2:slots,..."""
        return ",".join(f"{self.host(i)}:{slots}" for i in (hosts or range(1, self.n + 1)))

    def _check_host(self, i: int) -> None:
        if not 1 <= i <= self.n:
            raise ValueError(f"host index {i} outside 1..{self.n}")

    # ---- life cycle --------------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        # A SIGTERM (a cancelled CI job, `timeout`, `kill`) must still reach __exit__: hosts left
        # behind keep their sshd and workers running. (Background jobs of a shell ignore SIGINT.)
        self._previous_sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_system_exit)
        try:
            self.up()            # cleans up after itself when it fails
        except BaseException:
            self._restore_sigterm()
            raise
        return self

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def __exit__(self, *exc) -> None:
        try:
            self.down()
        finally:
            self._restore_sigterm()

    def up(self) -> "Cluster":
        why = missing_requirements()
        if why:
            raise ClusterError(why)
        self.down()  # a previous run's leftovers with this name
        try:
            self.state.mkdir(parents=True, mode=0o700)
            self._write_state()
            self._make_network()
            self._make_ssh()
            if self.rate:
                self.shape(self.rate)
            if self.loss:
                self.set_loss(self.loss)
            self._wait_for_ssh()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Remove everything this cluster name made; safe to call any number of times."""
        pattern = re.compile(rf"{re.escape(self.name)}-(br|h\d+)")
        listed = _run(["ip", "netns", "list"], check=False).stdout.split("\n")
        names = [line.split()[0] for line in listed if line.strip()]
        mine = [ns for ns in names if pattern.fullmatch(ns)]
        for ns in mine:
            self._kill_inside(ns)
        for ns in mine:
            _run(["ip", "netns", "del", ns], check=False)
        for d in Path("/etc/netns").glob(f"{self.name}-*") if Path("/etc/netns").is_dir() else []:
            if pattern.fullmatch(d.name):
                shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)
        left = [ns for ns in _run(["ip", "netns", "list"], check=False).stdout.split()
                if pattern.fullmatch(ns)]
        if left:
            raise ClusterError(f"could not remove namespaces {left}")

    @staticmethod
    def _kill_inside(ns: str) -> None:
        # Everything in the namespace is ours (sshd, workers, launchers): SIGKILL by PID, and
        # wait, or `ip netns del` leaves the namespace alive behind its last process.
        for _ in range(50):
            pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def _write_state(self) -> None:
        (self.state / "cluster.json").write_text(json.dumps({"n": self.n, "rate": self.rate,
                                                             "loss": self.loss}))

    @classmethod
    def load(cls, name: str = "prsgd") -> "Cluster":
        """The cluster ``up`` made earlier (for the CLI's later commands)."""
        path = STATE_ROOT / name / "cluster.json"
        if not path.exists():
            raise ClusterError(f"no cluster '{name}' is up (no {path})")
        info = json.loads(path.read_text())
        return cls(info["n"], info["rate"], name, info.get("loss", 0.0))

    # ---- network -----------------------------------------------------------------------------
    def _make_network(self) -> None:
        br = self.bridge_ns
        _run(["ip", "netns", "add", br])
        _run(["ip", "-n", br, "link", "set", "lo", "up"])
        _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", br, "link", "set", "br0", "up"])
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{self.addr(i)} {self.host(i)}\n" for i in range(1, self.n + 1))
        for i in range(1, self.n + 1):
            ns = self.ns(i)
            _run(["ip", "netns", "add", ns])
            # The veth pair is made inside the bridge namespace with its peer born in the host's
            # namespace as eth0: nothing ever appears on the machine's own interfaces.
            _run(["ip", "-n", br, "link", "add", f"v{i}", "type", "veth",
                  "peer", "name", "eth0", "netns", ns])
            _run(["ip", "-n", br, "link", "set", f"v{i}", "master", "br0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.addr(i)}/{PREFIX_LEN}", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)

    def shape(self, rate: Optional[str]) -> None:
        """tbf at ``rate`` on both ends of every link (None/'none': unshaped)."""
        rate = None if rate in (None, "none") else rate
        for i in range(1, self.n + 1):
            for ns, dev in ((self.ns(i), "eth0"), (self.bridge_ns, f"v{i}")):
                if rate is None:
                    _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                         check=False)
                    continue
                burst = max(64 * 1024, int(rate_bits(rate) / 8 * 0.002))
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                      "tbf", "rate", rate, "burst", str(burst), "latency", "50ms"])
        self.rate = rate
        if self.state.exists():
            self._write_state()

    def apply_profile(self, profile: Optional[str]) -> None:
        """Rate and loss from a profile such as '100mbit+loss0.1%' (see parse_profile)."""
        rate, loss = parse_profile(profile)
        self.shape(rate)
        self.set_loss(loss)

    def set_loss(self, loss: float) -> None:
        """Drop a random fraction ``loss`` of the packets arriving on every host's eth0 (the
        input hook: real loss, which TCP retransmits), counting both; 0 removes the rule. The
        table is made anew, so its counters start at zero; the rule is checked to be in place."""
        _check_loss(loss)
        if loss and shutil.which("nft") is None:
            raise ClusterError("packet loss needs 'nft' (apt-get install nftables; "
                               "make setup-cluster installs it)")
        for i in range(1, self.n + 1):
            ns = self.ns(i)
            if shutil.which("nft") is not None:
                _run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", LOSS_TABLE],
                     check=False)   # absent is fine
            if not loss:
                continue
            ruleset = (
                f"table inet {LOSS_TABLE} {{\n"
                "  chain input {\n"
                "    type filter hook input priority 0; policy accept;\n"
                '    iifname "eth0" counter comment "seen"\n'
                f'    iifname "eth0" numgen random mod {LOSS_SCALE} < {round(loss * LOSS_SCALE)} '
                'counter drop comment "dropped"\n'
                "  }\n}\n")
            _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset)
        self.loss = loss
        if self.state.exists():
            self._write_state()
        if loss:
            self.loss_counters()   # raises unless every host has the rule

    def loss_counters(self) -> Dict[str, Dict[str, int]]:
        """{host: {"seen": packets arriving on eth0, "dropped": of those}} from the rule's
        counters; raises if a host lacks the rule."""
        out = {}
        for i in range(1, self.n + 1):
            proc = _run(["ip", "netns", "exec", self.ns(i), "nft", "-j", "list", "table", "inet",
                         LOSS_TABLE], check=False)
            counts = {}
            if proc.returncode == 0:
                for item in json.loads(proc.stdout).get("nftables", []):
                    rule = item.get("rule")
                    if not rule or rule.get("comment") not in ("seen", "dropped"):
                        continue
                    counter = next((e["counter"] for e in rule["expr"] if "counter" in e), None)
                    if counter is not None:
                        counts[rule["comment"]] = int(counter["packets"])
            if set(counts) != {"seen", "dropped"}:
                raise ClusterError(f"the loss rule is not in place on {self.host(i)} "
                                   f"({proc.stderr.strip() or 'no counters'})")
            out[self.host(i)] = counts
        return out

    def kill_jobs(self) -> int:
        """SIGKILL everything on the hosts but their sshd (workers of a job that hung or failed,
        which a timeout on the launcher alone leaves behind). Returns how many were killed."""
        keep = set()
        for i in range(1, self.n + 1):
            pid_file = self.state / f"sshd_{i}.pid"
            if pid_file.exists():
                keep.add(int(pid_file.read_text().split()[0]))
        killed = 0
        for _ in range(50):
            pids = [p for i in range(1, self.n + 1) for p in self.pids(i) if p not in keep]
            if not pids:
                return killed
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        raise ClusterError("processes on the hosts survived SIGKILL")

    # ---- ssh ---------------------------------------------------------------------------------
    def _make_ssh(self) -> None:
        s = self.state
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.name}-cluster",
              "-f", str(s / "id_ed25519")])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(s / "host_key")])
        shutil.copy(s / "id_ed25519.pub", s / "authorized_keys")
        (s / "ssh_config").write_text(
            "Host *\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n"
            "  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  BatchMode yes\n"
            # 5 s failed under load on 2 cores; horovodrun opens one connection per worker.
            "  ConnectTimeout 30\n  LogLevel ERROR\n".format(key=s / "id_ed25519"))
        bin_dir = s / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {s / 'ssh_config'} \"$@\"\n")
        wrapper.chmod(0o755)
        (s / "home").mkdir()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)   # sshd's privilege-separation dir
        for i in range(1, self.n + 1):
            cfg = s / f"sshd_{i}.conf"
            cfg.write_text("\n".join([
                f"ListenAddress {self.addr(i)}", "Port 22",
                f"HostKey {s / 'host_key'}", f"PidFile {s / f'sshd_{i}.pid'}",
                f"AuthorizedKeysFile {s / 'authorized_keys'}",
                "PermitRootLogin prohibit-password", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
                "PrintMotd no", "LogLevel ERROR",
                # horovodrun opens a connection per worker at once, more under elastic.
                "MaxStartups 100:30:200", "MaxSessions 100", ""]))
            _run([SSHD, "-t", "-f", str(cfg)])
            # sshd daemonizes; its UTS namespace (own hostname) goes with it to every session.
            _run(["ip", "netns", "exec", self.ns(i), "unshare", "--uts", "sh", "-c",
                  f"hostname {self.host(i)} && exec {SSHD} -f {cfg}"])

    def _wait_for_ssh(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for i in range(1, self.n + 1):
            while True:
                probe = _run(self.exec_argv(1, ["ssh", self.host(i), "hostname"]), check=False,
                             env=self.env(), timeout=timeout)
                if probe.returncode == 0 and probe.stdout.strip() == self.host(i):
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(f"ssh to {self.host(i)} failed: {probe.stderr.strip()}"
                                       f" {probe.stdout.strip()}")
                time.sleep(0.2)

    # ---- running things ----------------------------------------------------------------------
    def exec_argv(self, i: int, argv: Sequence[str]) -> List[str]:
        """``argv`` run on host i: its network namespace (names resolve to the cluster) and its
        hostname. horovodrun runs the ranks of the host it is on without ssh; with the
        machine's hostname there, such a rank segfaulted in Gloo's setup."""
        return ["ip", "netns", "exec", self.ns(i), "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.host(i), *argv]

    def env(self, base: Optional[Dict[str, str]] = None,
            venv_bin: Optional[str] = None) -> Dict[str, str]:
        """The launcher's environment: the ssh wrapper first on PATH, HOME in the state dir.

        horovodrun exports its whole environment (PATH included) to every worker, so the venv
        must be at the same path on every host -- here it is the same file system."""
        env = dict(os.environ if base is None else base)
        path = [str(self.state / "bin")] + ([venv_bin] if venv_bin else []) + [env.get("PATH", "")]
        env["PATH"] = os.pathsep.join(p for p in path if p)
        env["HOME"] = str(self.state / "home")
        return env

    def link_mbits(self, src: int, dst: int, seconds: float = 1.5) -> float:
        """Measured single-stream TCP throughput from host src to host dst, Mbit/s."""
        port = 5201
        server = subprocess.Popen(self.exec_argv(dst, [sys.executable, "-c", (
            "import socket, time\n"
            f"s = socket.create_server(('{self.addr(dst)}', {port}))\n"
            "c, _ = s.accept(); n = 0; t = time.monotonic()\n"
            "while True:\n"
            "    b = c.recv(1 << 20)\n"
            "    if not b: break\n"
            "    n += len(b)\n"
            "print(n * 8 / (time.monotonic() - t) / 1e6)\n")]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            client = [sys.executable, "-c", (
                "import socket, time\n"
                "for _ in range(100):\n"
                "    try:\n"
                f"        s = socket.create_connection(('{self.addr(dst)}', {port})); break\n"
                "    except OSError: time.sleep(0.05)\n"
                "buf = b'x' * (1 << 20); t = time.monotonic()\n"
                f"while time.monotonic() - t < {seconds}: s.sendall(buf)\n"
                "s.close()\n")]
            _run(self.exec_argv(src, client), timeout=seconds + 30)
            out, err = server.communicate(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        if server.returncode != 0:
            raise ClusterError(f"throughput probe failed: {err.strip()}")
        return float(out)

    def pids(self, i: int) -> List[int]:
        return [int(p) for p in _run(["ip", "netns", "pids", self.ns(i)]).stdout.split()]

    def status(self) -> str:
        lines = [f"cluster '{self.name}': {self.n} hosts, rate {self.rate or 'unshaped'}, "
                 + (f"loss {self.loss:.4%} on every host's input, " if self.loss else "")
                 + f"state {self.state}"]
        for i in range(1, self.n + 1):
            ns = self.ns(i)
            addr = _run(["ip", "-n", ns, "-br", "addr", "show", "eth0"], check=False).stdout.split()
            qdisc = _run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "eth0"],
                         check=False).stdout.strip().splitlines()
            sshd_up = (self.state / f"sshd_{i}.pid").exists()
            lines.append(f"  {self.host(i):<8} ns {ns:<12} {' '.join(addr[2:3]) or '-':<16} "
                         f"sshd {'up' if sshd_up else 'down'}  {qdisc[0] if qdisc else '-'}")
        if self.loss:
            for host, c in self.loss_counters().items():
                lines.append(f"  {host:<8} loss rule: dropped {c['dropped']} of {c['seen']} "
                             f"packets arriving on eth0"
                             + (f" ({c['dropped'] / c['seen']:.3%})" if c["seen"] else ""))
        return "\n".join(lines)


def _repo_venv_bin() -> Optional[str]:
    venv = REPO / ".venv" / "bin"
    return str(venv) if venv.is_dir() else None


def main(argv: Sequence[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="cluster.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default=os.environ.get("PRSGD_CLUSTER", "prsgd"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up")
    p.add_argument("n", type=int)
    p.add_argument("rate", nargs="?", default=None, help="100mbit, none, or 100mbit+loss0.1%%")
    p.add_argument("--loss", type=float, default=None, help="fraction of packets dropped")
    p = sub.add_parser("shape")
    p.add_argument("rate", help="100mbit, none, or 100mbit+loss0.1%% (loss kept unless given)")
    p.add_argument("--loss", type=float, default=None)
    sub.add_parser("loss").add_argument("fraction", type=float, help="0.001 = 0.1%%; 0 removes")
    for name in ("exec", "hvd"):
        p = sub.add_parser(name)
        p.add_argument("host", type=int)
        p.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("hosts").add_argument("slots", type=int, nargs="?", default=1)
    sub.add_parser("status")
    sub.add_parser("down")
    args = ap.parse_args(argv)

    if args.cmd == "up":
        rate, loss = parse_profile(args.rate)
        c = Cluster(args.n, rate, args.name, loss if args.loss is None else args.loss).up()
        print(c.status())
        return 0
    if args.cmd == "down":
        # The sweep needs only the name, not the state (which may be gone after a failure).
        Cluster(1, None, args.name).down()
        return 0
    c = Cluster.load(args.name)
    if args.cmd == "shape":
        rate, loss = parse_profile(args.rate)
        c.shape(rate)
        if args.loss is not None or "+loss" in args.rate:
            c.set_loss(loss if args.loss is None else args.loss)
        print(c.status())
    elif args.cmd == "loss":
        c.set_loss(args.fraction)
        print(c.status())
    elif args.cmd == "status":
        print(c.status())
    elif args.cmd == "hosts":
        print(c.hosts_arg(args.slots))
    else:
        if not args.command:
            ap.error(f"{args.cmd}: give a command")
        env = c.env(venv_bin=_repo_venv_bin()) if args.cmd == "hvd" else None
        return subprocess.call(c.exec_argv(args.host, args.command), env=env)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        sys.exit(1)
