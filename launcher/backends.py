"""Backends: each a small function from a plan to the command that starts the ranks.

Every command ends in `launcher.worker --run_dir RUN`: the worker reads the resolved job and
DeepSpeed config that `labs launch` wrote into the run folder, so all ranks run the same thing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import LabsError
from launcher.masking import mask
from launcher.rank_env import accelerator, extensions_dir

if TYPE_CHECKING:
    from launcher.plan import Plan

REPO = Path(__file__).resolve().parent.parent
# Passed from the launching shell to every rank (also on other hosts, through the env file).
PASS_PREFIXES = ("HF_", "WANDB_", "LABS_", "NCCL_", "GLOO_")
PASS_THROUGH = ("TRANSFORMERS_OFFLINE", "MALLOC_MMAP_THRESHOLD_")


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def runner_env(plan: Plan) -> dict[str, str]:
    """What every rank needs in its environment; also written as the runner's DS_ENV_FILE."""
    per_host = max(plan.hostfile.hosts.values())
    env = {
        "DS_ACCELERATOR": accelerator(),
        "TORCH_EXTENSIONS_DIR": extensions_dir(),
        "OMP_NUM_THREADS": str(max((os.cpu_count() or 1) // per_host, 1)),
        # The venv's bin first: its ninja builds DeepSpeed's ops; a second ninja version on PATH
        # (e.g. /usr/bin) hashes commands differently and forces rebuilds of the shared cache.
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in sorted(os.environ.items()):
        if value and (key.startswith(PASS_PREFIXES) or key in PASS_THROUGH):
            env[key] = value
    for _, values in deepspeed_env_files():
        env.update(values)
    if plan.job.backend == "ssh" and plan.job.cluster.launcher == "openmpi":  # read by worker's MPI discovery
        env["LABS_MASTER_PORT"] = str(plan.master_port)
        if plan.job.cluster.master_addr:
            env["LABS_MASTER_ADDR"] = plan.job.cluster.master_addr
    return env


DEEPSPEED_ENV = ".deepspeed_env"


def deepspeed_env_files() -> list[tuple[Path, dict[str, str]]]:
    """`.deepspeed_env` in the home folder, then the working folder, as DeepSpeed's runner reads them
    (KEY=VALUE lines, exported to every rank; the later file wins). `labs` reads them itself and puts
    them in the ranks' environment on every backend: the runner it starts reads `labs`'s own env file
    instead (DS_ENV_FILE). Blank and '#' lines are skipped (DeepSpeed's runner would crash on them)."""
    out = []
    for folder in (Path.home(), Path.cwd()):
        f = folder / DEEPSPEED_ENV
        if not f.is_file() or (out and f.resolve() == out[0][0].resolve()):
            continue
        values: dict[str, str] = {}
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LabsError(f"{f}: cannot be read as UTF-8 text ({e}); DeepSpeed's runner reads it as KEY=VALUE "
                            f"lines: fix or remove it") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
                raise LabsError(f"{f}:{n}: {line.strip()!r} is not KEY=VALUE; DeepSpeed's runner exports each "
                                f"line of this file to every rank: fix the line or remove it")
            values[key.strip()] = value.strip()
        out.append((f, values))
    return out


# DeepSpeed's runner writes each env file line into a remote shell as `export KEY=VALUE` (in double
# quotes when VALUE has a space or other special character): these would be expanded or break it.
_UNSAFE = re.compile(r'["$`\\\n]')


def check_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LabsError(f"environment variable name {key!r} cannot be passed to the ranks")
        if _UNSAFE.search(value):
            raise LabsError(f"environment variable {key} holds a quote, '$', backtick, backslash or newline; "
                            f"DeepSpeed's runner passes it to other hosts through a shell, where it would be "
                            f"changed: set it without those characters")


def env_file_text(env: dict[str, str]) -> str:
    """The DS_ENV_FILE: KEY=VALUE lines only. DeepSpeed's runner splits every line on '=' (a blank
    or comment line crashes it) and quotes the value itself, so values are written as they are."""
    check_env(env)
    return "".join(f"{k}={v}\n" for k, v in env.items())


def worker_args(plan: Plan) -> list[str]:
    """The worker reads the resolved job and DeepSpeed config from the run folder."""
    conf = ["--config_dir", str(plan.config_dir)] if plan.config_dir != plan.run_dir else []
    return ["--run_dir", str(plan.run_dir), *conf] + (["--resume"] if plan.resume else [])


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


def slurm_command(plan: Plan) -> list[str]:
    """sbatch the job script `labs launch` renders into the run folder (see render_slurm_script)."""
    return [shutil.which("sbatch") or "sbatch", "--parsable", str(plan.run_dir / "slurm_job.sh")]


SLURM_TEMPLATE = REPO / "scripts" / "slurm_job.sh"


def render_slurm_script(plan: Plan) -> str:
    """scripts/slurm_job.sh with this plan's #SBATCH values and settings: nodes and ranks per node
    from the hostfile's shape, the worker reading this run folder, the ranks' environment
    (secrets are not written: sbatch hands the submitting shell's environment to the job)."""
    c, hf = plan.job.cluster, plan.hostfile
    procs = next(iter(hf.hosts.values()))
    sbatch = {"job-name": f"labs-{plan.job.name}", "nodes": str(len(hf.hosts)), "ntasks-per-node": "1",
              "cpus-per-task": str(c.cpus_per_task or procs), "time": c.time,
              "output": str(plan.run_dir / "logs" / "slurm-%j.out")}
    if c.partition:
        sbatch["partition"] = c.partition
    settings = {"LABS_REPO": str(REPO), "LABS_BIN": str(Path(sys.executable).parent),
                "PROCS_PER_NODE": str(procs), "MASTER_PORT": str(plan.master_port),
                "LABS_WORKER_ARGS": " ".join(shlex.quote(a) for a in worker_args(plan))}
    settings |= {k: v for k, v in plan.env.items() if mask(k, v) == v}
    header = [f"#SBATCH --{k}={v}" for k, v in sbatch.items()] + [f"#SBATCH {a}" for a in c.sbatch_args]
    out = []
    for line in SLURM_TEMPLATE.read_text().splitlines():
        m = re.match(r"#SBATCH --([a-z-]+)=", line)
        if m and m[1] in sbatch:  # the template's defaults, replaced by this plan's header
            if header:
                out += header
                header = []
            continue
        if line == "# @labs-settings":
            out.append(f"# rendered by `labs launch --backend slurm` for {plan.run_dir}")
            out += [f"export {k}={shlex.quote(v)}" for k, v in settings.items()]
            continue
        out.append(line)
    return "\n".join(out) + "\n"


COMMANDS = {"local": local_command, "torchrun": torchrun_command, "ssh": ssh_command, "slurm": slurm_command}


def build_command(plan: Plan) -> list[str]:
    return COMMANDS[plan.job.backend](plan)
