"""The cluster test infrastructure itself, exercised for real on this machine.

cluster: 2 fake hosts (network + UTS namespaces, sshd each; tests/cluster/fakehosts.py):
    ssh between them, a host whose sshd is gone (`labs launch` onto them: test_cluster_launch.py).
slurm:   a private single-node Slurm (tests/cluster/slurm.py): `srun hostname`, a 2-rank torchrun.
Both need root and scripts/install_cluster_deps.sh; each test skips with the reason otherwise.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `cluster` package, whatever pytest's rootdir
from cluster import PROBE, REPO, VENV_BIN, prepare_comm_op, probe_ranks  # noqa: E402
from cluster.fakehosts import FakeCluster, cluster_unavailable_reason  # noqa: E402
from cluster.slurm import SingleNodeSlurm, slurm_unavailable_reason  # noqa: E402


@pytest.fixture
def cluster(tmp_path):
    if reason := cluster_unavailable_reason():
        pytest.skip(reason)
    with FakeCluster(2, tmp_path / "cluster") as c:
        yield c


@pytest.fixture(scope="module")
def ds_env():
    """The ranks' environment, with DeepSpeed's comm op built beforehand (its own time limit)."""
    if not (VENV_BIN / "deepspeed").exists():
        pytest.skip(f"no deepspeed in {VENV_BIN}")
    return prepare_comm_op()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if reason := slurm_unavailable_reason():
        pytest.skip(reason)
    with SingleNodeSlurm(tmp_path_factory.mktemp("slurm"), cpus=2) as s:
        yield s


@pytest.mark.cluster
def test_ssh_between_fake_hosts(cluster):
    assert cluster.hosts == ["node1", "node2"]
    res = cluster.exec("node1", "hostname; ssh node2 hostname; ssh node2 'ip -4 -o addr show eth0'", timeout=30)
    assert res.returncode == 0, res.stderr
    here, there, addr = res.stdout.splitlines()
    assert (here, there) == ("node1", "node2")
    assert cluster.addrs["node2"] + "/24" in addr
    assert cluster.hostfile_text(1) == "node1 slots=1\nnode2 slots=1\n"


@pytest.mark.cluster
def test_ssh_fails_fast_when_sshd_stopped(cluster):
    cluster.stop_sshd("node2")
    start = time.monotonic()
    res = cluster.exec("node1", ["ssh", "node2", "true"], timeout=30)
    assert res.returncode != 0
    assert time.monotonic() - start < 8, "ssh to a dead host should fail within ConnectTimeout"
    assert cluster.exec("node2", ["hostname"]).stdout.strip() == "node2"  # the host itself is still there


def write_job(path: Path, body: str, cpus: int = 1) -> Path:
    header = f"#!/bin/bash\n#SBATCH -N 1\n#SBATCH -n 1\n#SBATCH -c {cpus}\n#SBATCH -o {path}.%j.out\n"
    path.write_text(f"{header}set -e\n{body}\n")
    return path


@pytest.mark.slurm
def test_slurm_srun_hostname(slurm, tmp_path):
    job = slurm.submit(write_job(tmp_path / "hostname.sh", "srun hostname"))
    assert slurm.wait(job, timeout=60) == "COMPLETED"
    assert Path(f"{tmp_path}/hostname.sh.{job}.out").read_text().strip() == slurm.node


@pytest.mark.slurm
def test_slurm_torchrun_two_ranks(ds_env, slurm, tmp_path):
    body = f"cd {REPO}\nsrun {VENV_BIN}/torchrun --standalone --nproc_per_node 2 {PROBE}"
    job = slurm.submit(write_job(tmp_path / "torchrun.sh", body, cpus=2), env=ds_env)
    state = slurm.wait(job, timeout=120)
    out = Path(f"{tmp_path}/torchrun.sh.{job}.out").read_text()
    assert state == "COMPLETED", out[-4000:]
    assert set(probe_ranks(out)) == {0, 1} and "PROBE_OK world=2" in out, out[-4000:]
