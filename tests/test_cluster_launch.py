"""`labs launch` onto real (fake) hosts and a real Slurm, as a user on a cluster's head node runs it.

cluster: fake hosts (network + UTS namespaces with their own sshd; tests/cluster/fakehosts.py).
    `labs launch` runs on node1 with a multi-host hostfile (backend ssh: DeepSpeed's runner over
    pdsh); every rank trains and the losses equal a one-host run of the same world size. A host
    whose sshd is stopped is named within 60 s before anything starts; a rank killed mid-run ends
    the whole job with a non-zero code within 60 s.
slurm: `labs launch --backend slurm` renders scripts/slurm_job.sh, submits it to a private
    single-node Slurm, waits, and the job trains.
Both need root and scripts/install_cluster_deps.sh; each test skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `cluster` package, whatever pytest's rootdir
from cluster import REPO, VENV_BIN, prepare_comm_op  # noqa: E402
from cluster.fakehosts import FakeCluster, cluster_unavailable_reason  # noqa: E402
from cluster.slurm import SingleNodeSlurm, slurm_unavailable_reason  # noqa: E402
from conftest import read_metrics, run_dirs, summary, wait_for_steps  # noqa: E402

JOB = "jobs/fine_tune_dry_run.yaml"  # tiny Llama, built-in text, ds_configs/cpu_dry_run.json
STEPS = ("--max_steps", "4", "--set", "train.export=false")
RANK_LINE = re.compile(r"^(?:\S+: )?rank (\d+) host (\S+): (\d+) steps, (\d+) samples", re.M)


@pytest.fixture(scope="module")
def rank_env():
    """DeepSpeed's comm op built beforehand (own time limit), and the environment for the ranks."""
    if not (VENV_BIN / "deepspeed").exists():
        pytest.skip(f"no deepspeed in {VENV_BIN}")
    return {**prepare_comm_op(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def _cluster(n: int, tmp_path_factory):
    if reason := cluster_unavailable_reason():
        pytest.skip(reason)
    with FakeCluster(n, tmp_path_factory.mktemp(f"cluster{n}")) as c:
        yield c


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    yield from _cluster(2, tmp_path_factory)


@pytest.fixture(scope="module")
def three_hosts(tmp_path_factory):
    yield from _cluster(3, tmp_path_factory)


def labs_cmd(*args: str) -> list[str]:
    return [str(VENV_BIN / "python"), "-m", "launcher.cli", *args]


def labs_on(cluster: FakeCluster, host: str, out: Path, *args: str, env: dict, timeout: float = 240):
    """`labs launch JOB ...` run on a fake host from the repository root; returns (result, run_dir)."""
    res = cluster.exec(host, labs_cmd("launch", JOB, "--set", f"train.output_dir={out}", *args),
                       env=env, cwd=REPO, timeout=timeout)
    dirs = run_dirs(out)
    return res, (dirs[-1] if dirs else None)


_reference: dict[int, Path] = {}


def reference(world: int, rank_env: dict, tmp_path_factory) -> Path:
    """The same job on this machine alone (backend local, `localhost slots=world`), once per world."""
    if world not in _reference:
        out = tmp_path_factory.mktemp(f"ref{world}")
        hosts = out / "hosts"
        hosts.write_text(f"localhost slots={world}\n")
        res = subprocess.run(labs_cmd("launch", JOB, "--hostfile", str(hosts), "--set", f"train.output_dir={out}",
                                      *STEPS), cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, **rank_env})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        _reference[world] = run_dirs(out)[-1]
    return _reference[world]


def assert_trained_like(run_dir: Path, ref: Path, output: str, hosts: list[str]) -> None:
    ranks = {int(m[1]): (m[2], int(m[3]), int(m[4])) for m in RANK_LINE.finditer(output)}
    assert sorted(ranks) == list(range(len(hosts))), output[-4000:]
    assert [ranks[r][0] for r in sorted(ranks)] == hosts  # one rank per host, in hostfile order
    assert all(steps == 4 and samples > 0 for _, steps, samples in ranks.values())
    s = summary(run_dir)
    assert s["world"] == len(hosts) and [r["host"] for r in s["ranks"]] == hosts
    got, want = read_metrics(run_dir), read_metrics(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    assert s["eval_loss"] == pytest.approx(summary(ref)["eval_loss"], rel=1e-5)


@pytest.mark.cluster
def test_three_hosts_over_ssh_equal_one_host(rank_env, three_hosts, tmp_path, tmp_path_factory):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(three_hosts.hostfile_text(1))
    env = {**rank_env, "WANDB_API_KEY": "sekrit-key-123"}  # passed to the ranks, never printed
    res, run_dir = labs_on(three_hosts, "node1", tmp_path / "runs", "--hostfile", str(hostfile), *STEPS, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert "backend ssh (pdsh)" in out and "checking ssh to node1, node2, node3" in out
    assert "pdsh" in out  # DeepSpeed's multi-node runner, not the local one
    assert_trained_like(run_dir, reference(3, rank_env, tmp_path_factory), out, ["node1", "node2", "node3"])
    assert "sekrit-key-123" not in out and "WANDB_API_KEY=***" in out
    env_file = run_dir / "ds_env"
    text = env_file.read_text()
    assert "WANDB_API_KEY=sekrit-key-123\n" in text and env_file.stat().st_mode & 0o077 == 0
    assert "DS_ACCELERATOR=cpu\n" in text and f"TORCH_EXTENSIONS_DIR={rank_env['TORCH_EXTENSIONS_DIR']}\n" in text
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", line) for line in text.splitlines())


@pytest.mark.cluster
def test_exclude_runs_on_the_other_hosts(rank_env, three_hosts, tmp_path, tmp_path_factory):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(three_hosts.hostfile_text(1))
    res, run_dir = labs_on(three_hosts, "node1", tmp_path / "runs", "--hostfile", str(hostfile),
                           "--exclude", "node2", *STEPS, env=rank_env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert "--exclude node2" in out
    assert_trained_like(run_dir, reference(2, rank_env, tmp_path_factory), out, ["node1", "node3"])


@pytest.mark.cluster
def test_dead_sshd_is_named_before_launch(rank_env, three_hosts, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(three_hosts.hostfile_text(1))
    three_hosts.stop_sshd("node3")
    try:
        start = time.monotonic()
        res, run_dir = labs_on(three_hosts, "node1", tmp_path / "runs", "--hostfile", str(hostfile), *STEPS,
                               env=rank_env, timeout=90)
        took = time.monotonic() - start
    finally:
        three_hosts.start_sshd("node3")  # the module's other tests use node3
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert took < 60
    assert "1 of 3 hosts failed the ssh check" in res.stderr and "  node3: " in res.stderr
    assert "node1:" not in res.stderr and "--exclude node3" in res.stderr
    assert run_dir is None  # refused before the run folder was written


@pytest.mark.cluster
def test_openmpi_launcher_on_two_hosts(rank_env, two_hosts, tmp_path, tmp_path_factory):
    import shutil
    if not shutil.which("mpirun"):
        pytest.skip("no mpirun (Open MPI): apt install openmpi-bin to run the openmpi launcher")
    if subprocess.run([str(VENV_BIN / "python"), "-c", "import mpi4py"], capture_output=True).returncode:
        pytest.skip(f"no mpi4py in {VENV_BIN.parent}: pip install mpi4py")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(two_hosts.hostfile_text(1))
    env = {**rank_env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # tests run as root
    res, run_dir = labs_on(two_hosts, "node1", tmp_path / "runs", "--hostfile", str(hostfile), "--launcher", "openmpi",
                           *STEPS, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert "mpirun" in out
    assert_trained_like(run_dir, reference(2, rank_env, tmp_path_factory), out, ["node1", "node2"])


def _worker_pids(cluster: FakeCluster, host: str) -> list[int]:
    """The training processes (not DeepSpeed's per-node launcher) running in host's namespace."""
    pids = subprocess.run(["ip", "netns", "pids", cluster.netns[host]], capture_output=True, text=True).stdout.split()
    found = []
    for pid in map(int, pids):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launcher.worker" in argv and b"deepspeed.launcher.launch" not in argv:
            found.append(pid)
    return found


@pytest.mark.cluster
def test_killed_rank_ends_the_job(rank_env, two_hosts, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(two_hosts.hostfile_text(1))
    out = tmp_path / "runs"
    proc = two_hosts.popen("node1", labs_cmd("launch", JOB, "--hostfile", str(hostfile), "--set",
                                             f"train.output_dir={out}", "--epochs", "1000", "--max_steps", "100000",
                                             "--set", "train.export=false"), env=rank_env, cwd=REPO)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:  # mid-run: a few steps logged
            dirs = run_dirs(out)
            if dirs and (dirs[-1] / "metrics.jsonl").exists() and len(read_metrics(dirs[-1])) >= 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        (victim,) = _worker_pids(two_hosts, "node2")
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the job still runs 60 s after one of its ranks was killed")
        assert time.monotonic() - killed < 60
        assert proc.returncode != 0, output[-4000:]
        last = output[output.rindex("run failed with exit code"):]
        assert "rank 1 on host node2 ended without a word" in last, output[-4000:]  # the killed one, named last
        assert "logs/rank1.log" in last
        assert not _worker_pids(two_hosts, "node1") and not _worker_pids(two_hosts, "node2")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slurm
def test_slurm_backend_submits_and_trains(rank_env, tmp_path, tmp_path_factory):
    if reason := slurm_unavailable_reason():
        pytest.skip(reason)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")  # the shape: 1 node x 2 ranks; Slurm picks the node
    out = tmp_path / "runs"
    with SingleNodeSlurm(tmp_path / "slurm", cpus=2) as slurm:
        res = subprocess.run(labs_cmd("launch", JOB, "--backend", "slurm", "--hostfile", str(hostfile),
                                      "--set", f"train.output_dir={out}", *STEPS),
                             cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, **slurm.env, **rank_env})
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-5000:]
    (run_dir,) = run_dirs(out)
    job_id = (run_dir / "slurm_job_id").read_text().strip()
    assert f"submitted Slurm job {job_id}" in output and "COMPLETED" in output
    script = (run_dir / "slurm_job.sh").read_text()
    assert "#SBATCH --nodes=1\n" in script and "#SBATCH --cpus-per-task=2\n" in script
    assert f"export LABS_WORKER_ARGS='--run_dir {run_dir}'" in script
    log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    ranks = {int(m[1]) for m in RANK_LINE.finditer(log)}
    assert ranks == {0, 1}, log[-4000:]
    got, want = read_metrics(run_dir), read_metrics(reference(2, rank_env, tmp_path_factory))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    assert json.loads((run_dir / "summary.json").read_text())["world"] == 2


LONG = ("--epochs", "20", "--max_steps", "16", "--set", "train.export=false")
_long_reference: list[float] = []


def long_reference(rank_env: dict, tmp_path_factory) -> list[float]:
    """16 uninterrupted steps of the job on 2 local ranks: what a stopped-and-resumed run must match."""
    if not _long_reference:
        out = tmp_path_factory.mktemp("long_ref")
        hosts = out / "hosts"
        hosts.write_text("localhost slots=2\n")
        res = subprocess.run(labs_cmd("launch", JOB, "--hostfile", str(hosts), "--set", f"train.output_dir={out}",
                                      *LONG), cwd=REPO, capture_output=True, text=True, timeout=400,
                             env={**os.environ, **rank_env})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        _long_reference.extend(r["loss"] for r in read_metrics(run_dirs(out)[-1]))
    return _long_reference


@pytest.mark.cluster
def test_sigterm_over_ssh_saves_on_every_host_and_resumes(rank_env, two_hosts, tmp_path, tmp_path_factory):
    """SIGTERM to `labs launch` on node1: the ranks on node1 and node2 (started by pdsh, never signalled)
    see the run's STOP file, save one checkpoint together and exit 75; nothing runs on either host;
    `--resume` continues to the uninterrupted run's losses."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(two_hosts.hostfile_text(1))
    out = tmp_path / "runs"
    proc = two_hosts.popen("node1", labs_cmd("launch", JOB, "--hostfile", str(hostfile), "--set",
                                             f"train.output_dir={out}", *LONG), env=rank_env, cwd=REPO)
    try:
        run_dir = wait_for_steps(proc, out, 2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 75, output[-5000:]
    step = json.loads((run_dir / "stopped.json").read_text())["step"]
    assert f"run stopped after step {step} (SIGTERM to labs launch)" in output
    assert not _worker_pids(two_hosts, "node1") and not _worker_pids(two_hosts, "node2")
    res = two_hosts.exec("node1", labs_cmd("launch", "--resume", str(run_dir)), env=rank_env, cwd=REPO, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    got = [r["loss"] for r in read_metrics(run_dir)]
    assert got == pytest.approx(long_reference(rank_env, tmp_path_factory), rel=1e-5)


@pytest.mark.slurm
def test_slurm_sigterm_to_the_batch_shell_saves_and_resumes(rank_env, tmp_path, tmp_path_factory):
    """What Slurm does before a job's time limit (--signal=B:TERM@120), done by hand with
    `scancel --batch --signal=TERM`: the batch shell writes the STOP file, the ranks save and exit 75,
    `labs` reports the stop; `--resume` through Slurm again finishes with the uninterrupted losses."""
    if reason := slurm_unavailable_reason():
        pytest.skip(reason)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "runs"
    with SingleNodeSlurm(tmp_path / "slurm", cpus=2) as slurm:
        env = {**os.environ, **slurm.env, **rank_env}
        proc = subprocess.Popen(labs_cmd("launch", JOB, "--backend", "slurm", "--hostfile", str(hostfile),
                                         "--set", f"train.output_dir={out}", *LONG), cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            run_dir = wait_for_steps(proc, out, 2)
            job_id = (run_dir / "slurm_job_id").read_text().strip()
            subprocess.run(["scancel", "--batch", "--signal=TERM", job_id], env=env, check=True, timeout=30)
            output, _ = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 75, output[-5000:]
        assert "#SBATCH --signal=B:TERM@120" in (run_dir / "slurm_job.sh").read_text()
        step = json.loads((run_dir / "stopped.json").read_text())["step"]
        assert f"stopped after step {step}" in output and "STOP file" in output
        res = subprocess.run(labs_cmd("launch", "--resume", str(run_dir), "--backend", "slurm"), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    got = [r["loss"] for r in read_metrics(run_dir)]
    assert got == pytest.approx(long_reference(rank_env, tmp_path_factory), rel=1e-5)
