"""A cluster of N "nodes" on this machine: one network namespace per node, for multi-node tests.

Each node ``i`` is a network namespace with its own interface ``eth0`` (one end of a veth pair),
address ``198.18.0.<i+1>/24`` (198.18.0.0/15 is the range set aside for benchmarking networks, so
it clashes with no real network), a hostname ``node<i>`` (a UTS namespace per process started on
it) and a hosts file ``/etc/netns/<namespace>/hosts`` (``ip netns exec`` mounts it over /etc/hosts).
The veth pairs meet on a bridge inside one more namespace, the switch: nothing is created in this
machine's own network namespace, so nothing of the cluster is reachable from outside it and no
traffic leaves it.

Teardown runs on every exit path: ``Cluster.close`` (the pytest fixture's finalizer, and an atexit
hook for an interpreter that exits without running it); and every namespace carries the creating
process's pid in its name (``mft<pid>-...``), so a killed test's leftovers are removed by the next
cluster started on the machine (``remove_stale``).

Needs root and iproute2's ``ip``, and ``unshare`` (util-linux). ``cluster_problem()`` says why a
cluster cannot be built here, for the tests to skip (or fail under CI=true).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PREFIX = "mft"
NETNS_ETC = Path("/etc/netns")
SUBNET = "198.18.0"


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30, check=check)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cluster_problem() -> str | None:
    """Why namespaces cannot be built here, or None."""
    if os.geteuid() != 0:
        return "the cluster harness needs root (network namespaces, veth pairs)"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    probe = f"{PREFIX}{os.getpid()}-probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"network namespaces are unavailable (`ip netns add`: {r.stderr.strip()})"
    try:
        r = subprocess.run(
            ["ip", "netns", "exec", probe, "unshare", "--uts", "hostname", "probe"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode != 0:
            return f"UTS namespaces are unavailable (`unshare --uts`: {r.stderr.strip()})"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def remove_stale() -> list[str]:
    """Delete the namespaces (and hosts files) of clusters whose creating process is gone, killing the
    processes still running in them; return their names."""
    names = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]
    stale = []
    for name in names:
        m = re.fullmatch(rf"{PREFIX}(\d+)-.+", name)
        if m and not _pid_alive(int(m.group(1))):
            _remove_namespace(name)
            stale.append(name)
    return stale


def _kill_all_in(name: str) -> None:
    """SIGKILL every process in namespace ``name`` (ranks outlive the launcher that started them: torchrun
    puts them in sessions of their own)."""
    for pid in _ip("netns", "pids", name, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _remove_namespace(name: str) -> None:
    """Kill every process still in namespace ``name``, then delete it and its hosts file."""
    _kill_all_in(name)
    _ip("netns", "del", name, check=False)
    shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


class Cluster:
    """``n`` nodes named ``node0``..``node<n-1>`` on one bridge. Use ``start()`` then ``close()``."""

    def __init__(self, n: int, tag: str = "c"):
        self.n = n
        self.prefix = f"{PREFIX}{os.getpid()}-{tag}"
        self.switch = f"{self.prefix}-sw"
        self.namespaces = [f"{self.prefix}-n{i}" for i in range(n)]
        self.hostnames = [f"node{i}" for i in range(n)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self.procs: list[subprocess.Popen] = []
        self._closed = False

    def start(self) -> Cluster:
        remove_stale()
        atexit.register(self.close)
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, ns in enumerate(self.namespaces):
                _ip("netns", "add", ns)
                # both ends are created inside namespaces of ours: none ever exists in this machine's own
                _ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
                _ip("-n", self.switch, "link", "set", f"p{i}", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                self.write_hosts(i)
        except BaseException:
            self.close()
            raise
        return self

    def write_hosts(self, node: int, omit: tuple[str, ...] = ()) -> None:
        """Node ``node``'s /etc/hosts: localhost and every node's name, but the names in ``omit``."""
        d = NETNS_ETC / self.namespaces[node]
        d.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"]
        lines += [f"{a} {h}" for a, h in zip(self.addresses, self.hostnames) if h not in omit]
        (d / "hosts").write_text("\n".join(lines) + "\n")

    def popen(self, node: int, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` on ``node`` (its network namespace and hosts file, hostname ``node<i>``), in a
        process group of its own so that ``close`` can stop it and everything it started."""
        wrapped = [
            "ip",
            "netns",
            "exec",
            self.namespaces[node],
            "unshare",
            "--uts",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            self.hostnames[node],
            *argv,
        ]
        p = subprocess.Popen(wrapped, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def meshforge(self, node: int, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        """``python -m meshforge ARGV`` on ``node`` from the repository, one compute thread per process, its
        stdout and stderr together in ``.stdout`` (text)."""
        return self.popen(
            node,
            [sys.executable, "-m", "meshforge", *argv],
            cwd=REPO,
            env={**(env or os.environ), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def set_link(self, node: int, up: bool) -> None:
        """Take ``node``'s interface down (its cable pulled) or up again."""
        _ip("-n", self.namespaces[node], "link", "set", "eth0", "up" if up else "down")

    def kill_node(self, node: int) -> None:
        """SIGKILL every process on ``node`` (the host is gone), whatever process group it is in."""
        _kill_all_in(self.namespaces[node])

    def rx_bytes(self, node: int) -> int:
        """Bytes ``node`` received on its interface (Ethernet frames: headers included)."""
        return self._counter(node, "rx_bytes")

    def tx_bytes(self, node: int) -> int:
        """Bytes ``node`` sent on its interface (Ethernet frames: headers included)."""
        return self._counter(node, "tx_bytes")

    def _counter(self, node: int, name: str) -> int:
        return int(_ip("netns", "exec", self.namespaces[node], "cat", f"/sys/class/net/eth0/statistics/{name}").stdout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        for ns in [*self.namespaces, self.switch]:
            _remove_namespace(ns)
        try:
            NETNS_ETC.rmdir()  # only if nothing else uses it
        except OSError:
            pass
        atexit.unregister(self.close)


def finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each process's output once it exits; one still running after ``timeout`` s in all is killed
    with everything it started (its output so far is returned, its returncode is then negative)."""
    deadline, logs = time.monotonic() + timeout, []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(0.1, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            logs.append(p.communicate()[0])
    return logs
