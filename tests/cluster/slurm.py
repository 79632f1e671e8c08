"""Single-node Slurm on this machine (munged + slurmctld + slurmd), for tests.

All state lives in ``workdir`` (plus a small munge folder under /tmp that the munge user can
reach); nothing is written to /etc. Clients find the cluster through ``SLURM_CONF``:

    with SingleNodeSlurm(tmp_path) as slurm:
        job = slurm.submit(script)               # sbatch --parsable, with slurm.env
        assert slurm.wait(job, 120) == "COMPLETED"

The daemons run in the foreground as children of this process (reaped at teardown, killed if
it dies) and listen on free ports of 127.0.0.1 only. Needs root and the Debian packages
slurm-wlm and munge (scripts/install_cluster_deps.sh).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from launcher.cli import SLURM_FINAL

from .fakehosts import StartStop, die_with_parent

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def slurm_unavailable_reason() -> str | None:
    """Why a private Slurm cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "single-node Slurm needs root (slurmd, munged as the munge user)"
    for tool in DAEMONS:
        if not (shutil.which(tool) or os.access(f"/usr/sbin/{tool}", os.X_OK)):
            return f"'{tool}' not found: run scripts/install_cluster_deps.sh (slurm-wlm, munge)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user: reinstall the munge package"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SingleNodeSlurm(StartStop):
    """One Slurm node named after this machine, partition `debug`, CPUs and memory as given."""

    def __init__(self, workdir: str | os.PathLike, cpus: int = 2, mem_mb: int = 8000):
        self.workdir = Path(workdir).resolve()
        self.cpus, self.mem_mb = cpus, mem_mb
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.workdir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []
        self._munge_dir: Path | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        socket_path = self._start_munge()
        ctld_port, slurmd_port = _free_port(), _free_port()
        w = self.workdir
        self.conf.write_text(f"""\
ClusterName=labs
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
CommunicationParameters=NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd.pid
SlurmctldLogFile={w}/log/slurmctld.log
SlurmdLogFile={w}/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        self._spawn([_exe("slurmctld"), "-D", "-c", "-f", str(self.conf)])  # -c: ignore saved state
        self._spawn([_exe("slurmd"), "-D", "-f", str(self.conf)])
        deadline = time.monotonic() + 30
        while True:
            state = self._run("sinfo", "-h", "-o", "%t").stdout.strip()
            if state.startswith("idle"):
                return
            if time.monotonic() > deadline or any(p.poll() is not None for p in self._procs):
                raise RuntimeError(f"slurm node not idle (state {state!r}); see {w}/log")
            time.sleep(0.2)

    def close(self) -> None:
        if self.conf.exists() and self._procs:
            self._run("scancel", "--user=root", check=False)
            deadline = time.monotonic() + 15
            while self._run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)
        for proc in reversed(self._procs):  # slurmd, slurmctld, munged
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        if self._munge_dir is not None:
            shutil.rmtree(self._munge_dir, ignore_errors=True)
            self._munge_dir = None

    # ----------------------------------------------------------------- jobs
    def submit(self, script_path: str | os.PathLike, extra_args: Sequence[str] = (),
               env: Mapping[str, str] | None = None) -> int:  # fmt: skip
        """sbatch the script (the job inherits self.env plus env); returns the job id."""
        res = self._run("sbatch", "--parsable", *extra_args, str(script_path), env=env)
        return int(res.stdout.strip().split(";")[0])

    def state(self, job_id: int) -> str:
        out = self._run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields.get("JobState", "UNKNOWN")

    def wait(self, job_id: int, timeout: float = 120) -> str:
        """Poll until the job reaches a final state and return it (e.g. COMPLETED, FAILED).

        Polls instead of `sbatch --wait` (whose back-off adds up to ~30 s). On timeout the job
        is cancelled and TimeoutError raised.
        """
        deadline = time.monotonic() + timeout
        while (state := self.state(job_id)) not in SLURM_FINAL:
            if time.monotonic() > deadline:
                self._run("scancel", str(job_id), check=False)
                raise TimeoutError(f"slurm job {job_id} still {state} after {timeout} s")
            time.sleep(0.5)
        return state

    # ----------------------------------------------------------------- helpers
    def _run(self, tool: str, *args: str, env: Mapping[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:  # fmt: skip
        return subprocess.run(
            [_exe(tool), *args], env={**self.env, **(env or {})}, capture_output=True, text=True,
            check=check, timeout=60,
        )  # fmt: skip

    def _spawn(self, argv: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.workdir / "log" / f"{Path(argv[0]).name}.out", "ab")  # noqa: SIM115 (kept by the child)
        with log:
            proc = subprocess.Popen(
                argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent, **kwargs,
            )  # fmt: skip
        self._procs.append(proc)
        return proc

    def _start_munge(self) -> Path:
        """munged as the munge user, with a private key and socket in a folder it can reach."""
        self._munge_dir = d = Path(tempfile.mkdtemp(prefix="labs-munge-"))
        munge = pwd.getpwnam("munge")
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path in (d, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        d.chmod(0o711)
        key.chmod(0o400)
        sock = d / "munge.socket"
        self._spawn(
            [_exe("munged"), "--foreground", f"--key-file={key}", f"--socket={sock}",
             f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
            user=munge.pw_uid, group=munge.pw_gid, extra_groups=[],
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline or self._procs[-1].poll() is not None:
                raise RuntimeError(f"munged did not start; see {d}/munged.log")
            time.sleep(0.05)
        return sock
