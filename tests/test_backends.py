"""Backends as `labs plan` shows them (no process started): ssh (pdsh / openmpi), slurm, filters, env."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import REPO, labs

from launcher.common.errors import LabsError
from launcher.config.hostfile import parse_hostfile, select


def _hosts(tmp_path, text: str):
    path = tmp_path / "hosts"
    path.write_text(text)
    return str(path)


def plan(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return labs("plan", "jobs/fine_tune_dry_run.yaml", "-v", *args, env=env)  # -v: the whole plan


def command_line(out: str) -> str:
    return out.split("== command\n", 1)[1].strip()


def test_remote_hosts_pick_the_ssh_backend(tmp_path):
    proc = plan("--hostfile", _hosts(tmp_path, "node1 slots=2\nnode2 slots=2\n"), "--master_addr", "10.0.0.1",
                "--ssh_port", "2222")
    assert proc.returncode == 0, proc.stderr
    cmd = command_line(proc.stdout)
    assert "backend ssh (pdsh)" in proc.stdout and "world 4 = dp 4" in proc.stdout
    assert "--no_ssh_check" not in cmd and "--ssh_port 2222 --master_addr 10.0.0.1" in cmd
    assert cmd.endswith("--module launcher.worker --run_dir " + cmd.split("--run_dir ")[1])
    assert f"--hostfile {tmp_path}/hosts" in cmd  # absolute: the runner starts from the repository root


def test_openmpi_launcher_is_passed_to_deepspeed(tmp_path):
    proc = plan("--hostfile", _hosts(tmp_path, "node1 slots=1\nnode2 slots=1\n"), "--launcher", "openmpi")
    assert proc.returncode == 0, proc.stderr
    assert "--launcher openmpi --module launcher.worker" in command_line(proc.stdout)
    assert "backend ssh (openmpi)" in proc.stdout


@pytest.mark.parametrize("args,words", [
    (["--backend", "local"], ["node1, node2 are not this machine", "--backend ssh"]),
    (["--backend", "torchrun"], ["backend = 'torchrun' starts ranks here only"]),
    (["--launcher", "mpich"], ["cluster.launcher = 'mpich'", "pdsh, openmpi"]),
    (["--include", "node3"], ["host 'node3' is not in", "node1@node2:0,1"]),
    (["--include", "node1", "--exclude", "node2"], ["cannot be used together"]),
    (["--exclude", "node1@node2"], ["leaves no host"]),
    (["--include", "node2:5"], ["node2 has slots 0..1"]),
])  # fmt: skip
def test_bad_cluster_settings_are_refused(tmp_path, args, words):
    proc = plan("--hostfile", _hosts(tmp_path, "node1 slots=2\nnode2 slots=2\n"), *args)
    assert proc.returncode == 2, proc.stdout
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_include_and_exclude_follow_deepspeed_syntax():
    hf = parse_hostfile("a slots=4\nb slots=2\nc slots=1\n", "hf")
    assert select(hf, include="c@a:0,1").hosts == {"a": 2, "c": 1}  # the file's order
    assert select(hf, exclude="b:1@c").hosts == {"a": 4, "b": 1}
    assert select(hf).hosts == hf.hosts
    with pytest.raises(LabsError, match="slots of 'a' must be numbers"):
        select(hf, include="a:x")


def test_filters_shrink_the_world_and_reach_the_runner(tmp_path):
    proc = plan("--hostfile", _hosts(tmp_path, "node1 slots=2\nnode2 slots=2\n"), "--exclude", "node2:1")
    assert proc.returncode == 0, proc.stderr
    assert "world 3 = dp 3" in proc.stdout and "--exclude node2:1" in command_line(proc.stdout)
    assert "node2 slots=1" in proc.stdout


def test_slurm_plan_and_script(tmp_path):
    from launcher.launch.make_plan import make_plan
    from launcher.launch.slurm import render_slurm_script
    hosts = _hosts(tmp_path, "a slots=2\nb slots=2\n")
    p = make_plan("jobs/fine_tune_dry_run.yaml", hostfile=hosts, backend="slurm",
                  sets=["cluster.partition=cpu", "cluster.time=00:10:00", "cluster.sbatch_args=[--account=ml]"],
                  run_dir=str(tmp_path / "run"))
    assert p.command[-1] == str(tmp_path / "run" / "slurm_job.sh")
    script = render_slurm_script(p)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --time=00:10:00", "#SBATCH --partition=cpu", "#SBATCH --account=ml",
                 f"#SBATCH --output={tmp_path}/run/logs/slurm-%j.out", "export PROCS_PER_NODE=2",
                 f"export LABS_WORKER_ARGS='--run_dir {tmp_path}/run'", "export DS_ACCELERATOR=cpu"):
        assert line + "\n" in script, line
    assert script.count("#SBATCH --nodes=") == 1  # the template's default was replaced
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    with pytest.raises(LabsError, match="slots differ between hosts"):
        make_plan("jobs/fine_tune_dry_run.yaml", hostfile=_hosts(tmp_path, "a slots=2\nb slots=1\n"),
                  backend="slurm")


def test_slurm_template_refuses_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run(["bash", str(REPO / "scripts" / "slurm_job.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "not inside a Slurm job" in res.stderr


def test_ranks_environment_passes_hf_and_wandb_and_masks_secrets(tmp_path):
    env = {"WANDB_API_KEY": "abc123secret", "HF_TOKEN": "hf_secret", "WANDB_PROJECT": "p1", "HF_HOME": "/data/hf"}
    proc = plan("--hostfile", _hosts(tmp_path, "node1 slots=1\n"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "WANDB_API_KEY=***" in proc.stdout and "HF_TOKEN=***" in proc.stdout
    assert "abc123secret" not in proc.stdout and "hf_secret" not in proc.stdout
    assert "WANDB_PROJECT=p1" in proc.stdout and "HF_HOME=/data/hf" in proc.stdout


def test_ranks_openmp_threads_sleep_when_they_wait_unless_the_user_says_otherwise(monkeypatch):
    """OMP_WAIT_POLICY=PASSIVE by default (libgomp's spin-wait doubled a rank's CPU beside other work:
    bench/omp_wait.py); a user's own value reaches the ranks unchanged."""
    from launcher.common.proc import rank_environment
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert rank_environment(2)["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert rank_environment(2)["OMP_WAIT_POLICY"] == "ACTIVE"


def test_unsafe_environment_value_is_refused(tmp_path):
    proc = plan(env={"WANDB_NOTES": 'say "hi" $HOME'})
    assert proc.returncode == 2
    assert "WANDB_NOTES" in proc.stderr and "quote, '$'" in proc.stderr


def test_ssh_check_names_every_unreachable_host(tmp_path):
    """The real check against hosts that cannot answer (no fake cluster needed: the names do not resolve)."""
    from launcher.launch.backends import check_ssh
    from launcher.launch.make_plan import make_plan
    if not subprocess.run(["which", "ssh"], capture_output=True).returncode == 0:
        pytest.skip("no ssh client")
    hosts = _hosts(tmp_path, "no-such-host-1.invalid slots=1\nno-such-host-2.invalid slots=1\n")
    p = make_plan("jobs/fine_tune_dry_run.yaml", hostfile=hosts, run_dir=str(tmp_path / "run"))
    with pytest.raises(LabsError) as e:
        check_ssh(p)
    msg = str(e.value)
    assert "2 of 2 hosts failed the ssh check" in msg
    assert "no-such-host-1.invalid:" in msg and "no-such-host-2.invalid:" in msg
    assert "--exclude no-such-host-1.invalid@no-such-host-2.invalid" in msg
