"""Backends: each a small function from a plan to the command that starts the ranks.

Every command ends in `launcher.worker --run_dir RUN`: the worker reads the resolved job and
DeepSpeed config that `labs launch` wrote into the run folder, so all ranks run the same thing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from launcher.common.errors import LabsError
from launcher.common.run_dir import REPO
from launcher.launch.env import _bin
from launcher.launch.plan import Plan, worker_args
from launcher.launch.slurm import slurm_command


def _filters(plan: Plan) -> list[str]:
    c = plan.job.cluster
    return ((["--include", c.include] if c.include else []) + (["--exclude", c.exclude] if c.exclude else [])
            + (["--num_nodes", str(c.num_nodes)] if c.num_nodes else [])
            + (["--num_gpus", str(c.num_accelerators)] if c.num_accelerators else []))


def local_command(plan: Plan) -> list[str]:
    cmd = [_bin("deepspeed"), "--hostfile", str(plan.hostfile.path), *_filters(plan), "--no_ssh_check",
           "--master_addr", "127.0.0.1", "--master_port", str(plan.master_port)]
    if shutil.which("numactl") and len(os.sched_getaffinity(0)) >= plan.layout.world:
        cmd.append("--bind_cores_to_rank")  # DeepSpeed asserts >= 1 core per rank: more ranks than cores run unbound
    return cmd + ["--module", "launcher.worker", *worker_args(plan)]


def ssh_command(plan: Plan) -> list[str]:
    """DeepSpeed's multi-node runner: pdsh (or mpirun) starts `deepspeed.launcher.launch` on every
    host, in this repository's folder, with the env file's variables exported. `labs launch` runs it
    from the repository root after `check_ssh` has reached every host."""
    c = plan.job.cluster
    cmd = [_bin("deepspeed"), "--hostfile", str(Path(plan.hostfile.path).resolve()), *_filters(plan)]
    if c.ssh_port:
        cmd += ["--ssh_port", str(c.ssh_port)]
    if c.master_addr:
        cmd += ["--master_addr", c.master_addr]
    cmd += ["--master_port", str(plan.master_port)]
    if c.launcher != "pdsh":
        cmd += ["--launcher", c.launcher]
    return cmd + ["--module", "launcher.worker", *worker_args(plan)]


def ssh_probe(host: str, port: int | None, timeout: int) -> list[str]:
    """One host's check: key login (no password prompt) and this venv's python at the same path."""
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}", *(["-p", str(port)] if port else []),
            host, f"test -x {shlex.quote(sys.executable)} && test -d {shlex.quote(str(REPO))}"]


def check_tools(plan: Plan) -> None:
    """The programs the ssh backend's runner calls, on this machine."""
    need = {"pdsh": ("pdsh", "install pdsh (scripts/install_cluster_deps.sh does)"),
            "openmpi": ("mpirun", "install Open MPI (apt install openmpi-bin) and `pip install mpi4py` on "
                                  "every host, or use --launcher pdsh")}[plan.job.cluster.launcher]
    for tool in ("ssh", need[0]):
        if not shutil.which(tool):
            fix = need[1] if tool == need[0] else "install the OpenSSH client"
            raise LabsError(f"--backend ssh needs `{tool}` on this machine, and it is not on PATH: {fix}")


def check_ssh(plan: Plan) -> None:
    """Before launching: every host answers ssh within the timeout, or a LabsError names the hosts.

    Without this a dead host does not fail the run: pdsh starts the others, whose ranks then wait
    for the missing one until the rendezvous times out (30 minutes)."""
    c = plan.job.cluster
    hosts = list(plan.hostfile.hosts)

    def probe(host: str) -> tuple[str, int, str]:
        try:
            res = subprocess.run(ssh_probe(host, c.ssh_port, c.ssh_timeout), capture_output=True, text=True,
                                 timeout=c.ssh_timeout + 10, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return host, -1, f"no answer within {c.ssh_timeout + 10} s"
        except FileNotFoundError:
            return host, -2, "the `ssh` client is not installed here"
        return host, res.returncode, (res.stderr.strip().splitlines() or [""])[-1]

    with ThreadPoolExecutor(max_workers=min(len(hosts), 32)) as pool:
        results = list(pool.map(probe, hosts))
    bad = [r for r in results if r[1] != 0]
    if not bad:
        return
    lines = []
    for host, code, why in bad:
        if code == 1:
            why = (f"ssh works, but {sys.executable} or {REPO} is missing there: every host needs this "
                   f"repository and its venv at the same path (a shared filesystem)")
        lines.append(f"  {host}: {why or f'ssh exited with {code}'}")
    port = f" -p {c.ssh_port}" if c.ssh_port else ""
    raise LabsError(f"{plan.hostfile.path}: {len(bad)} of {len(hosts)} hosts failed the ssh check "
                    f"(ssh -o BatchMode=yes -o ConnectTimeout={c.ssh_timeout}{port} HOST):\n" + "\n".join(lines)
                    + f"\nfix: start sshd and allow key login there (ssh {bad[0][0]} true must work "
                    f"without a password), or leave the host out with --exclude {'@'.join(b[0] for b in bad)}")


def torchrun_command(plan: Plan) -> list[str]:
    return [_bin("torchrun"), "--nnodes", "1", "--nproc_per_node", str(plan.layout.world),
            "--master_addr", "127.0.0.1", "--master_port", str(plan.master_port),
            "-m", "launcher.worker", *worker_args(plan)]


COMMANDS = {"local": local_command, "torchrun": torchrun_command, "ssh": ssh_command, "slurm": slurm_command}


def build_command(plan: Plan) -> list[str]:
    return COMMANDS[plan.job.backend](plan)
