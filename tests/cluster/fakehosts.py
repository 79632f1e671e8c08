"""A real multi-host cluster on one Linux machine, for multi-node launcher tests.

Each fake host ``nodeK`` is
  * a network namespace with one address, ``10.231.0.(10+K)``, on a bridge that lives in a
    namespace of its own (nothing is added to the machine's own network namespace),
  * a UTS namespace, so ``hostname`` says ``nodeK``,
  * an sshd listening on port 22 of that address, key-based root login,
  * its own ``/etc/hosts`` and ssh client config through ``/etc/netns/<ns>/`` (``ip netns exec``
    bind-mounts them over ``/etc/hosts`` and ``/etc/ssh``), so no global file changes.
All hosts share the filesystem, like nodes with an NFS home: same venv, same code paths.

    with FakeCluster(2, tmp_path) as cluster:
        cluster.exec("node1", "ssh node2 hostname").stdout   # -> "node2\\n"

Needs root, iproute2, util-linux (unshare, nsenter), openssh-server/-client; pdsh for DeepSpeed's
multi-host runner (scripts/install_cluster_deps.sh installs them all).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from itertools import count
from pathlib import Path

SUBNET = "10.231.0"  # a private /24 that no real interface here uses
SSHD = "/usr/sbin/sshd"
NETNS_ETC = Path("/etc/netns")
_NAME_RE = re.compile(r"^lc(\d+)n(\d+)-")  # lc<owner pid>n<instance>-<host>
_instances = count()

Command = str | Sequence[str]


def die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the Python process that started it dies (even by SIGKILL),
    so a crashed test run leaves no daemons behind (only empty namespaces, which clean_stale removes)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie, left to an init that does not reap, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill_all(pids: list[int], grace: float = 2.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)


def _netns_list() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _remove_netns(ns: str) -> None:
    """Kill every process in network namespace ns, delete it and its /etc/netns overlay."""
    pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
    _kill_all(pids)
    _ip("netns", "del", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def clean_stale() -> list[str]:
    """Remove namespaces (and their processes) left by FakeClusters whose process has died."""
    removed = []
    names = set(_netns_list()) | {p.name for p in NETNS_ETC.glob("lc*")}
    for ns in sorted(names):
        m = _NAME_RE.match(ns)
        if m and not _alive(int(m.group(1))):
            _remove_netns(ns)
            removed.append(ns)
    if removed:
        try:
            NETNS_ETC.rmdir()  # made by the dead run; kept if anything else lives there
        except OSError:
            pass
    return removed


def cluster_unavailable_reason() -> str | None:
    """Why fake hosts cannot be made on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "fake hosts need root (network namespaces, sshd)"
    for tool in ("ip", "unshare", "nsenter", "ssh", "ssh-keygen", "pdsh"):
        if not shutil.which(tool):
            return f"'{tool}' not found: run scripts/install_cluster_deps.sh"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found: run scripts/install_cluster_deps.sh (openssh-server)"
    probe = f"lc{os.getpid()}n999-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"'ip netns add' does not work here: {made.stderr.strip()}"
    try:
        res = _ip("netns", "exec", probe, "ip", "link", "set", "lo", "up", check=False)
        if res.returncode != 0:
            return f"'ip netns exec' does not work here: {res.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class StartStop:
    """A context manager over start() and close(): close() also runs when start() fails half-way."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FakeCluster(StartStop):
    """N fake hosts node1..nodeN; use as a context manager (teardown always runs)."""

    def __init__(self, n: int = 2, workdir: str | os.PathLike = "/tmp/fakecluster", subnet: str = SUBNET):
        if not 1 <= n <= 200:
            raise ValueError(f"n must be in 1..200, got {n}")
        self.workdir = Path(workdir).resolve()
        self.hosts = [f"node{k}" for k in range(1, n + 1)]
        self.addrs = {h: f"{subnet}.{10 + k}" for k, h in enumerate(self.hosts, start=1)}
        tag = f"lc{os.getpid()}n{next(_instances)}"
        self.netns = {h: f"{tag}-{h}" for h in self.hosts}
        self.hub = f"{tag}-hub"
        self.key = self.workdir / "id_ed25519"
        self._anchors: dict[str, subprocess.Popen] = {}  # one `sleep` per host holds its UTS namespace
        self._sshd: dict[str, subprocess.Popen] = {}
        self._made_netns_etc = False

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        clean_stale()
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self._made_netns_etc = not NETNS_ETC.exists()
        self._write_keys()
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for k, host in enumerate(self.hosts, start=1):
            ns = self.netns[host]
            _ip("netns", "add", ns)
            _ip("link", "add", f"v{k}", "netns", self.hub, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.hub, "link", "set", f"v{k}", "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addrs[host]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            self._write_etc(host)
            self._start_anchor(host)
            self.start_sshd(host)
        for src in self.hosts:  # full mesh: every host reaches every host by name
            for dst in self.hosts:
                res = self.exec(src, ["ssh", dst, "hostname"], timeout=20)
                if res.stdout.strip() != dst:
                    raise RuntimeError(f"ssh {src} -> {dst} failed: {res.stdout!r} {res.stderr!r}")

    def close(self) -> None:
        """Kill everything running in the fake hosts, remove namespaces and /etc/netns entries."""
        for host in self.hosts:
            _remove_netns(self.netns[host])
        for proc in [*self._sshd.values(), *self._anchors.values()]:  # already killed above: reap them
            proc.kill()
            proc.wait()
        self._sshd.clear()
        self._anchors.clear()
        if self.hub in _netns_list():
            _ip("netns", "del", self.hub, check=False)
        if self._made_netns_etc:
            try:
                NETNS_ETC.rmdir()
            except OSError:
                pass  # not empty: another cluster uses it

    # ----------------------------------------------------------------- running things on hosts
    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs argv inside host's network, mount (/etc overlays) and UTS namespaces."""
        uts = f"/proc/{self._anchors[host].pid}/ns/uts"
        return ["ip", "netns", "exec", self.netns[host], "nsenter", f"--uts={uts}", "--", *argv]

    def popen(self, host: str, cmd: Command, env: Mapping[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start cmd (a shell string or an argv) on host; env adds to os.environ. Own session."""
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        return subprocess.Popen(
            self.command(host, argv), env={**os.environ, **(env or {})}, text=True,
            start_new_session=True, preexec_fn=die_with_parent, **kwargs,
        )  # fmt: skip

    def exec(
        self, host: str, cmd: Command, env: Mapping[str, str] | None = None, timeout: float = 60, **kwargs
    ) -> subprocess.CompletedProcess:
        """Run cmd on host and wait; stdout and stderr captured separately as text.

        On timeout the whole process group is killed and subprocess.TimeoutExpired raised.
        """
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        proc = self.popen(host, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    # ----------------------------------------------------------------- sshd
    def start_sshd(self, host: str) -> None:
        pidfile = self.workdir / f"sshd_{host}.pid"
        pidfile.unlink(missing_ok=True)
        conf = self.workdir / f"sshd_{host}.conf"
        conf.write_text(
            f"ListenAddress {self.addrs[host]}\nPort 22\nPidFile {pidfile}\n"
            f"HostKey {self.workdir / 'ssh_host_ed25519_key'}\n"
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\n"
            "AcceptEnv LANG LC_*\nSubsystem sftp internal-sftp\n"
        )
        log = self.workdir / f"sshd_{host}.log"
        # -D: stays our child, so stop_sshd/close can reap it (this machine's init reaps no orphans)
        sshd = self.popen(host, [SSHD, "-D", "-f", str(conf), "-E", str(log)], stdout=subprocess.DEVNULL)
        self._sshd[host] = sshd
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text().strip()):  # written once it listens
            if sshd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {host} did not start (exit {sshd.poll()}); see {log}")
            time.sleep(0.05)

    def stop_sshd(self, host: str) -> None:
        """Stop host's sshd (open sessions survive, new connections are refused)."""
        sshd = self._sshd.pop(host, None)
        if sshd is not None:
            sshd.terminate()
            try:
                sshd.wait(timeout=5)
            except subprocess.TimeoutExpired:
                sshd.kill()
                sshd.wait()

    # ----------------------------------------------------------------- files
    def hostfile_text(self, slots: int | Mapping[str, int] = 1) -> str:
        """DeepSpeed hostfile text: one `host slots=N` line per host."""
        per_host = slots if isinstance(slots, Mapping) else {h: slots for h in self.hosts}
        return "".join(f"{h} slots={per_host[h]}\n" for h in self.hosts if h in per_host)

    def _write_keys(self) -> None:
        for name in ("ssh_host_ed25519_key", "id_ed25519"):
            path = self.workdir / name
            if not path.exists():
                keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fakecluster", "-f", str(path)]
                subprocess.run(keygen, check=True)
        auth = self.workdir / "authorized_keys"
        shutil.copy(self.key.with_suffix(".pub"), auth)
        for path in (self.key, auth, self.workdir / "ssh_host_ed25519_key"):
            path.chmod(0o600)

    def _write_etc(self, host: str) -> None:
        etc = NETNS_ETC / self.netns[host]
        (etc / "ssh").mkdir(parents=True, exist_ok=True)
        hosts = "127.0.0.1 localhost\n" + "".join(f"{self.addrs[h]} {h}\n" for h in self.hosts)
        (etc / "hosts").write_text(hosts)
        (etc / "hostname").write_text(host + "\n")
        (etc / "ssh" / "ssh_config").write_text(
            "Host *\n  User root\n"
            f"  IdentityFile {self.key}\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
            "  BatchMode yes\n  ConnectTimeout 5\n"
        )

    def _start_anchor(self, host: str) -> None:
        """A `sleep` in a fresh UTS namespace named host; exec() and sshd join that namespace."""
        anchor = subprocess.Popen(
            ["ip", "netns", "exec", self.netns[host], "unshare", "--uts", "--",
             "sh", "-c", f"hostname {host} && exec sleep infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        self._anchors[host] = anchor
        deadline = time.monotonic() + 10
        while anchor.poll() is None and Path(f"/proc/{anchor.pid}/comm").read_text().strip() != "sleep":
            if time.monotonic() > deadline:  # (comm becomes `sleep` once `hostname` has run)
                raise RuntimeError(f"could not make the UTS namespace of {host} (exit {anchor.poll()})")
            time.sleep(0.02)
        if anchor.poll() is not None:
            raise RuntimeError(f"could not make the UTS namespace of {host} (exit {anchor.returncode})")
