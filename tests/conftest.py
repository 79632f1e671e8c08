"""Shared test set-up: offline, CPU, a private pre-built DeepSpeed extension cache, and helpers
that run `labs` exactly as a user would (a real subprocess, real DeepSpeed ranks)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# the test processes' own torch (models loaded and generating in the test) as the ranks' (rank_environment):
# OpenMP threads sleep when they wait instead of spinning beside the other worker's ranks
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# the venv's bin first, as `labs launch` gives its ranks: its ninja builds DeepSpeed's comm op; another
# ninja on PATH (e.g. /usr/bin) would make the two rebuild the shared extension cache in turn
_VENV_BIN = str(Path(sys.executable).parent)
if not os.environ.get("PATH", "").startswith(_VENV_BIN + os.pathsep):
    os.environ["PATH"] = _VENV_BIN + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session")
def ds_ops() -> None:
    """Build DeepSpeed's CPU comm op once (about 20-70 s) before the first multi-rank test.

    A build killed mid-way leaves a `lock` file that makes every later rank wait for ever; one that no
    process holds open is such a leftover and is removed (launcher.common.proc.clear_stale_build_locks)."""
    from launcher.common.proc import clear_stale_build_locks
    clear_stale_build_locks(os.environ["TORCH_EXTENSIONS_DIR"])
    code = ("from deepspeed.accelerator import get_accelerator;"
            "get_accelerator().create_op_builder('ShareMemCommBuilder').load()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True, timeout=600)


def labs(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the `labs` CLI from the repository root. `labs plan` and `labs launch` run here: the same
    `launcher.cli.main` a user's `labs` runs, without a new interpreter importing DeepSpeed for it
    (2-3 s each, about a hundred launches in the suite); a launch still starts DeepSpeed's real runner,
    launch.py and ranks as processes. The other verbs, and any test that signals the `labs` process
    itself, run it as a subprocess (LABS_TEST_SUBPROCESS=1: every verb). An exception that escapes the
    CLI becomes exit code 1 with its traceback on stderr, as the interpreter would print it; a launch
    that outlives `timeout` raises subprocess.TimeoutExpired after its ranks are ended, as
    subprocess.run would."""
    if args and args[0] in IN_PROCESS and os.environ.get("LABS_TEST_SUBPROCESS") != "1":
        return _labs_here(args, env, timeout)
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=os.environ | (env or {}))


IN_PROCESS = ("plan", "launch")


def _labs_here(args: tuple[str, ...], env: dict | None, timeout: float) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import signal
    import traceback

    from launcher import cli

    def expired(signum, frame):
        raise subprocess.TimeoutExpired([sys.executable, "-m", "launcher.cli", *args], timeout)

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, code = dict(os.environ), os.getcwd(), 0
    saved_alarm = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    os.environ.update(env or {})
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)
            except subprocess.TimeoutExpired:
                raise
            except Exception:  # noqa: BLE001 - what the interpreter would do: traceback, exit 1
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved_alarm)
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess([sys.executable, "-m", "launcher.cli", *args], code, out.getvalue(),
                                       err.getvalue())


def run_dirs(output_dir: Path) -> list[Path]:
    return sorted(p.parent for p in output_dir.glob("*/*/job.yaml"))


def launch(job: str, output_dir: Path, *args: str, env: dict | None = None, timeout: int = 600):
    """`labs launch JOB` into output_dir; returns (process, run_dir or None)."""
    before = set(run_dirs(output_dir))
    proc = labs("launch", job, "--set", f"train.output_dir={output_dir}", *args, env=env, timeout=timeout)
    new = [d for d in run_dirs(output_dir) if d not in before]
    return proc, (new[-1] if new else None)


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def min_world(cfg: dict) -> int:
    """tp x pp x sp of a DeepSpeed config: the fewest ranks it runs on (the rest is data parallel)."""
    tp = int((cfg.get("tensor_parallel") or {}).get("autotp_size") or 1)
    pp = (cfg.get("pipeline") or {}).get("stages", 1)
    return tp * (pp if isinstance(pp, int) else 1) * int(cfg.get("sequence_parallel_size") or 1)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


def wait_for_steps(proc: subprocess.Popen, out: Path, n: int, timeout: float = 240) -> Path:
    """Wait until the newest run under `out` has logged n training steps (the job still running);
    returns its run folder. Fails the test if the job ends first or takes longer than `timeout`."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        dirs = run_dirs(out)
        if dirs and (dirs[-1] / "metrics.jsonl").exists() and len(read_metrics(dirs[-1])) >= n:
            return dirs[-1]
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"fewer than {n} steps within {timeout} s")


# ---------------------------------------------------------------- bf16 depends on the CPU

def _machine_bf16() -> bool:
    from launcher.config.ds.optim import cpu_has_bf16
    return bool(cpu_has_bf16())


MACHINE_BF16 = _machine_bf16()
"""This CPU lists avx512_bf16 or amx_bf16 (the plan refuses `bf16.enabled: true` elsewhere: emulated bf16
matmuls are many times slower than fp32). CI's machine is an AMD EPYC without AVX-512 some days."""

needs_bf16 = pytest.mark.skipif(not MACHINE_BF16, reason="this CPU lists neither avx512_bf16 nor amx_bf16, so labs "
                                "refuses bf16 here (emulated bf16 is many times slower than fp32); "
                                "tests/test_dsconfig.py checks that refusal")


@pytest.fixture
def bf16_cpu(tmp_path, monkeypatch):
    """A CPU that lists AMX-BF16, for in-process checks of bf16 configs on any machine: the plan reads
    /proc/cpuinfo (launcher/config/ds/optim.CPUINFO) and nothing else about the CPU."""
    info = tmp_path / "cpuinfo-bf16"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    monkeypatch.setattr("launcher.config.ds.optim.CPUINFO", info)
    return info


@pytest.fixture(scope="session")
def one_rank(ds_ops, tmp_path_factory) -> Path:
    """The reference of every equivalence test (tests/equivalence.py): ONE rank, ZeRO-0, micro batch 2 x 4
    accumulation steps = the global batch of 8 that every parallel run reads; run once per session, by
    whichever pytest-xdist worker asks first (the other waits on the lock and reads the same folder)."""
    from equivalence import run
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    with FileLock(str(root / "one_rank.lock")):
        made = root / "one_rank.run_dir"
        if not made.is_file():
            made.write_text(str(run(root / "one_rank", "ds_configs/zero0.json", 1, "ds.gradient_accumulation_steps=4")))
        return Path(made.read_text())


# ---------------------------------------------------------------- two workers (pytest-xdist), and what runs alone

HOSTS = ("cluster", "slurm", "container")
"""Markers of the tests that build fake hosts (network namespaces, sshd, Slurm, podman) under fixed names."""
HOST_FILES = ("test_cluster_infra.py", "test_cluster_launch.py", "test_container.py", "test_serve_deploy.py")
"""The files that hold them: one group between them, run on one worker, one test after the other."""
SERIAL = {"test_serve.py": ("test_bad_input_is_a_clear_4xx", "test_load_32_requests")}
"""Tests that time answers (a 4xx within 1 s, /health within 200 ms while 8 requests generate), by file and
name: marked `serial`, so `make test` runs them after the two workers, alone on the machine."""
FIRST = ("hosts", "test_equivalence_smollm2.py", "test_resume_layout.py", "test_equivalence_pipeline.py",
         "test_equivalence_tp_sp.py", "test_equivalence_dp.py", "test_faults.py")
"""The longest groups start first, so that neither worker is left with a long one at the end."""


def group_of(nodeid: str) -> str:
    """A test's group: its file, or "hosts" for the files of fake-host tests."""
    name = nodeid.split("::")[0].rsplit("/", 1)[-1]
    return "hosts" if name in HOST_FILES else name


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Order the groups longest first; mark the serial tests; refuse a fake-host test outside HOST_FILES
    (it would run beside another fake-host test on the other worker)."""
    for item in items:
        name = item.path.name
        if any(item.name.startswith(t) for t in SERIAL.get(name, ())):
            item.add_marker(pytest.mark.serial)
        if any(item.get_closest_marker(m) for m in HOSTS) and name not in HOST_FILES:
            raise pytest.UsageError(f"{item.nodeid} builds fake hosts: add {name} to HOST_FILES in tests/conftest.py")
    rank = {g: i for i, g in enumerate(FIRST)}
    items.sort(key=lambda it: rank.get(group_of(it.nodeid), len(FIRST)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` by `group_of`: each group's tests on one worker, so a module's runs are made once.
    (xdist's own loadgroup reads `xdist_group` marks into `item._nodeid`, which pytest 9 no longer reads:
    every file was split between the two workers, and its module-scoped runs made twice.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    # only under pytest-xdist's controller (this hook is xdist's)
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return ByGroup(config, log)


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """Under two pytest workers on a 2-core machine each worker's in-process torch work takes one thread
    (torch's default is every core; two workers would then spin against each other)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch  # the test process does torch work anyway; only when two workers share the machine
        torch.set_num_threads(1)
    yield


CPU_LOG = os.environ.get("LABS_TEST_CPU_LOG")
"""Where each test's wall time and CPU seconds (the test process and the processes it waited for: DeepSpeed's
runner, launch.py, the ranks) are appended as JSON lines; unset, nothing is recorded."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not CPU_LOG:
        yield
        return
    def cpu():
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime

    t0, (s0, c0) = time.monotonic(), cpu()
    yield
    t1, (s1, c1) = time.monotonic(), cpu()
    with open(CPU_LOG, "a") as f:
        f.write(json.dumps({"test": item.nodeid, "wall": round(t1 - t0, 2), "self": round(s1 - s0, 2),
                            "children": round(c1 - c0, 2), "worker": os.environ.get("PYTEST_XDIST_WORKER")})
                + "\n")
