"""The ranks' environment: what `labs launch` passes to them (the runner's env and DeepSpeed's
`.deepspeed_env` file for other hosts), secrets masked in what is shown, unsafe values refused.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from launcher.common.errors import LabsError
from launcher.common.proc import rank_environment
from launcher.launch.plan import Plan

# Passed from the launching shell to every rank (also on other hosts, through the env file).
PASS_PREFIXES = ("HF_", "WANDB_", "LABS_", "NCCL_", "GLOO_")


PASS_THROUGH = ("TRANSFORMERS_OFFLINE", "MALLOC_MMAP_THRESHOLD_")


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def runner_env(plan: Plan) -> dict[str, str]:
    """What every rank needs in its environment; also written as the runner's DS_ENV_FILE."""
    per_host = max(plan.hostfile.hosts.values())
    env = rank_environment(per_host)
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


def write_env_file(path: Path, env: dict[str, str]) -> Path:
    """Write the DS_ENV_FILE at `path`, readable by its owner only (it may hold secrets: WANDB_API_KEY,
    the server's API key)."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(env_file_text(env))
    return path
