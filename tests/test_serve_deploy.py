"""`labs serve` beyond one preset on one host: tp 3 on SmolLM2's shape (9 query / 3 key-value heads),
the targets a user deploys (a run folder's hf/ export, a checkpoint through `--step N`, a hub id from
the HF cache; offline or unreachable hub: a clear error), the project's container image, and the ssh
backend across two fake hosts. Every server is a real `labs serve` process answering the openai client
(or plain HTTP inside a fake host); greedy answers equal plain `model.generate` on the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_helpers import REPO, Server, alive, generate, reference, serve_ranks, shm_files

PROMPTS = ["The quick brown fox", "Parallelism on CPUs is", "Once upon a time, in a land far away,"]
TOKENS = (6, 9, 12)  # per prompt: rows of different lengths join and leave the batch at different steps
PAIRS = list(zip(PROMPTS, TOKENS, strict=True))


def _labs_serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`labs serve ARGS` that is expected to stop at the plan (nothing starts)."""
    return subprocess.run([sys.executable, "-m", "launcher.cli", "serve", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=90, env=os.environ | (env or {}))


def _complete(server: Server, model: str, prompt: str, n: int) -> str:
    r = server.client().completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
    assert r.usage.completion_tokens == n
    return r.choices[0].text


def _expected(model, tok) -> list[str]:
    return [generate(model, tok, tok(p)["input_ids"], n) for p, n in PAIRS]


# ------------------------------------------------------------------ tp 3 on SmolLM2's shape
@pytest.mark.distributed
def test_tp3_on_smollm2_shape_equals_one_rank_and_generate(tmp_path, ds_ops):
    """3 ranks (each 3 query heads, 1 key-value head), requests sent together (batched over the ranks);
    started by torchrun (`--backend torchrun`: tests/test_serve.py's tp 2 runs under the deepspeed runner);
    after SIGTERM no rank is left and no /dev/shm file of its rendezvous port."""
    from launcher.common.proc import free_port
    master_port = free_port()
    tp = Server(["smollm2-tiny", "--tp", "3", "--grace", "3", "--max-batch", "4", "--backend", "torchrun",
                 "--master_port", str(master_port)], tmp_path / "tp3")
    one = Server(["smollm2-tiny", "--threads", "1"], tmp_path / "one")
    try:
        want = _expected(*reference("smollm2-tiny"))  # built while the servers load
        tp.wait_ready(360)
        one.wait_ready(120)
        alone = [_complete(one, "smollm2-tiny", p, n) for p, n in PAIRS]
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda pn: _complete(tp, "smollm2-tiny", *pn), PAIRS, timeout=180))
        assert alone == want and together == want, (want, alone, together)
        assert len(set(want)) == 3  # the prompts matter: no constant output
        ranks = serve_ranks(tp.out)
        assert len(ranks) == 4, ranks  # torchrun and its 3 workers: each command line names serve.json
        assert tp.stop() == 0 and one.stop() == 0
        assert not [p for p in ranks if alive(p)], "a rank outlived labs serve"
        assert not shm_files(str(master_port)), "a /dev/shm file was left"
        console = tp.console()
        assert "== SIGTERM: the server drains" in console and "saves a checkpoint" not in console, console
        command = next(line for line in console.splitlines() if line.strip().startswith("command:"))
        assert "torchrun" in command and "deepspeed" not in command.split()[1], command
    finally:
        tp.stop()
        one.stop()


def test_a_tp_that_does_not_divide_the_heads_is_refused_at_plan_time(tmp_path):
    for tp in ("2", "4"):
        proc = _labs_serve("smollm2-tiny", "--tp", tp, "--out", str(tmp_path / "s"))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"--tp {tp}" in proc.stderr and "9 attention heads and 3 key-value heads" in proc.stderr
        assert "valid --tp for this model: 1, 3" in proc.stderr and "serve plan" not in proc.stdout


# ------------------------------------------------------------------ run folders, checkpoints, hub ids
@pytest.fixture(scope="module")
def run(ds_ops, tmp_path_factory) -> Path:
    """The smallest training run with a checkpoint of a strategy other than plain ZeRO-0: llama-tiny,
    ZeRO-3 on one rank, 2 steps, a checkpoint after each, and the hf/ export. The learning rate is above
    0 from the first update (docs/DEEPSPEED-CPU trap 17), so step 1's weights are not step 2's."""
    from conftest import assert_ok, launch
    out = tmp_path_factory.mktemp("runs")
    (out / "hosts1").write_text("localhost slots=1\n")
    proc, run_dir = launch("jobs/demo.yaml", out, "--hostfile", str(out / "hosts1"), "--ds-config",
                           "ds_configs/zero3.json", "--max_steps", "2", "--set", "train.save_every=1",
                           "train.checkpoint=true", "train.eval_every=0", "ds.scheduler.params.warmup_min_lr=0.001")
    assert_ok(proc)
    assert {p.name for p in (run_dir / "checkpoints").glob("step*")} == {"step1", "step2"}
    return run_dir


def _hub_cache(root: Path, repo: str, folder: Path) -> Path:
    """An HF hub cache (HF_HUB_CACHE layout) holding `folder` as the snapshot of `repo`'s main."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    model = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, model / "snapshots" / sha)
    (model / "refs").mkdir()
    (model / "refs" / "main").write_text(sha)
    return model / "snapshots" / sha


@pytest.mark.distributed
def test_a_run_its_zero3_checkpoint_and_a_cached_hub_id_are_served(run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cache = tmp_path / "hub"
    snapshot = _hub_cache(cache, "labs-test/tiny-llama", run / "hf")
    hub_env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    servers = {"run": Server([str(run), "--threads", "1"], tmp_path / "run"),
               "step": Server([str(run), "--step", "1", "--threads", "1", "--served-model-name", "s1"], tmp_path / "st"),
               "hub": Server(["labs-test/tiny-llama", "--threads", "1"], tmp_path / "hub-serve", env=hub_env)}
    try:
        for s in servers.values():
            s.wait_ready(240)
        assert "exporting" in servers["step"].console() and (run / "hf-step1" / "config.json").is_file()
        assert "hub model labs-test/tiny-llama from the HF cache" in servers["hub"].console()
        step1, final = load_file(run / "hf-step1" / "model.safetensors"), load_file(run / "hf" / "model.safetensors")
        assert any(not step1[k].equal(final[k]) for k in final)  # --step 1 is another model than hf/
        got = {}
        for kind, folder, name in (("run", run / "hf", str(run)), ("step", run / "hf-step1", "s1"),
                                   ("hub", snapshot, "labs-test/tiny-llama")):
            want = _expected(AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder))
            got[kind] = [_complete(servers[kind], name, p, n) for p, n in PAIRS]
            assert got[kind] == want, (kind, want, got[kind])
        assert got["step"] != got["run"], "step 1's answers equal the final weights'"
    finally:
        for s in servers.values():
            s.stop()


def test_a_hub_id_not_cached_offline_or_unreachable_online_is_a_clear_error(tmp_path):
    from launcher.common.proc import free_port
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    proc = _labs_serve("labs-test/not-here", env=env | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for words in ("'labs-test/not-here'", "not in the HF cache", "HF_HUB_OFFLINE=1", "hf download labs-test/not-here",
                  str(tmp_path / "empty-cache"), "a preset"):
        assert words in proc.stderr, (words, proc.stderr)
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the hub is unreachable
    proc = _labs_serve("labs-test/not-here", env=env | {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": nowhere})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unreachable" in proc.stderr and nowhere in proc.stderr and "hf download" in proc.stderr, proc.stderr


# ------------------------------------------------------------------ the container image
def _image_unavailable_reason() -> str | None:
    from test_container import BUILT, CTR_DIR, HOW_TO_BUILD, podman_env
    if not shutil.which("podman"):
        return "'podman' not found: run WITH_CONTAINERS=1 scripts/install_cluster_deps.sh"
    if not (CTR_DIR / "storage.conf").exists():
        return f"the project image is not built: {HOW_TO_BUILD}"
    res = subprocess.run(["podman", "image", "exists", BUILT], env=os.environ | podman_env(), timeout=60)
    return None if res.returncode == 0 else f"the project image ({BUILT}) is not built: {HOW_TO_BUILD}"


@pytest.mark.container
def test_the_image_serves_on_a_published_port_with_an_api_key(tmp_path):
    """`podman run -p PORT:8000 -e LABS_API_KEY IMAGE labs serve llama-tiny --host 0.0.0.0`, as a user
    deploys it (docker run -p): the container's own network, the port published on this host. Off loopback
    the key is required: /health answers without it, /v1/models is 401 without it; the openai client here
    with the key gets generate's answers; SIGTERM to `podman run` (proxied to labs, PID 1 of the container)
    stops it cleanly. It runs the image as built (rebuild it after a code change: scripts/build_image.sh
    --local, cached)."""
    if reason := _image_unavailable_reason():
        pytest.skip(reason)
    from test_container import BUILT, podman_env

    from launcher.common.proc import free_port
    port, name, key = free_port(), f"labs-serve-test-{os.getpid()}", "sk-container-test-1"
    cmd = ["podman", "run", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-e", "HF_HUB_OFFLINE=1",
           "-e", "OMP_NUM_THREADS=1", "-e", "LABS_API_KEY", BUILT, "labs", "serve", "llama-tiny", "--host", "0.0.0.0",
           "--port", "8000", "--threads", "1", "--grace", "3", "--dtype", "fp32"]
    server = Server.around(cmd, port, tmp_path / "podman", os.environ | podman_env() | {"LABS_API_KEY": key})
    try:
        server.wait_ready(300)
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
        server.key = key
        want = _expected(*reference("llama-tiny"))
        got = [_complete(server, "llama-tiny", p, n) for p, n in PAIRS]
        assert got == want, (want, got)
        assert server.stop() == 0, server.console()
        assert "server stopped (SIGTERM)" in server.console(), server.console()
        assert key not in server.console()
    finally:
        if server.proc.poll() is None:
            subprocess.run(["podman", "rm", "-f", "--ignore", name], env=os.environ | podman_env(),
                           capture_output=True, timeout=60)
        server.stop()


@pytest.mark.container
def test_the_image_serves_tp2_in_one_container_on_the_host_network(tmp_path):
    """docs/serving.md's first line with `--tp 2`: host networking (the loopback default reaches this host),
    two tensor-parallel ranks inside one container (DeepSpeed's runner there; `--shm-size 1g` for its
    shared-memory all-reduce), requests sent together: greedy answers equal `generate`'s here. The serve
    folder is mounted from this host (rank logs of both ranks land there); SIGTERM to `podman run` ends
    both ranks and the container."""
    if reason := _image_unavailable_reason():
        pytest.skip(reason)
    from test_container import BUILT, podman_env

    from launcher.common.proc import free_port
    port, master_port, name = free_port(), free_port(), f"labs-serve-tp2-{os.getpid()}"
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)  # the image's user (uid 1000) writes the serve folder there
    cmd = ["podman", "run", "--rm", "--name", name, "--network", "host", "--shm-size", "1g",
           "-v", f"{runs}:/app/runs", "-e", "HF_HUB_OFFLINE=1", "-e", "OMP_NUM_THREADS=1", BUILT,
           "labs", "serve", "llama-tiny", "--tp", "2", "--port", str(port), "--master_port", str(master_port),
           "--threads", "1", "--grace", "3", "--dtype", "fp32", "--max-batch", "4", "--out", "/app/runs/tp2"]
    server = Server.around(cmd, port, tmp_path / "podman", os.environ | podman_env())
    try:
        want = _expected(*reference("llama-tiny"))  # built while the container loads
        server.wait_ready(300)
        ranks = serve_ranks(Path("/app/runs/tp2"))  # this host sees the container's processes
        assert len(ranks) == 4, (ranks, server.console())  # DeepSpeed's runner, its launch.py, the 2 ranks
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda pn: _complete(server, "llama-tiny", *pn), PAIRS, timeout=180))
        assert got == want, (want, got)
        assert server.stop() == 0, server.console()
        assert "server stopped (SIGTERM)" in server.console(), server.console()
        assert not [p for p in ranks if alive(p)], "a rank outlived the container"
        assert sorted(p.name for p in (runs / "tp2" / "logs").glob("rank*.log")) == ["rank0.log", "rank1.log"]
        gone = subprocess.run(["podman", "container", "exists", name], env=os.environ | podman_env(), timeout=60)
        assert gone.returncode == 1, "the container is still there"
    finally:
        if server.proc.poll() is None:
            subprocess.run(["podman", "rm", "-f", "--ignore", name], env=os.environ | podman_env(),
                           capture_output=True, timeout=60)
        server.stop()


# ------------------------------------------------------------------ the ssh backend
CLIENT = r"""
import json, sys, time, httpx
url, key, prompts, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
t_end = time.monotonic() + 300
while time.monotonic() < t_end:
    try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
            break
    except httpx.TransportError:
        pass
    time.sleep(0.5)
out = [httpx.get(url + "/v1/models", timeout=10).status_code]  # no key: 401 (rank 0 got it over ssh)
for p, n in zip(prompts, tokens, strict=True):
    r = httpx.post(url + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                   json={"model": "llama-tiny", "prompt": p, "max_tokens": n, "temperature": 0})
    out.append(r.json()["choices"][0]["text"])
print(json.dumps(out))
"""


def _serve_ranks(cluster, host: str) -> list[int]:
    pids = subprocess.run(["ip", "netns", "pids", cluster.netns[host]], capture_output=True, text=True).stdout.split()
    found = []
    for pid in map(int, pids):
        try:
            if b"launcher.serve.rank" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.cluster
@pytest.mark.distributed
def test_ssh_backend_tp2_across_two_fake_hosts(tmp_path):
    """`labs serve llama-tiny --tp 2 --hostfile H` on node1 of two fake hosts (DeepSpeed's runner over
    pdsh, one rank per host, gloo between them): answers equal generate; SIGTERM ends both ranks."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cluster import VENV_BIN, prepare_comm_op
    from cluster.fakehosts import FakeCluster, cluster_unavailable_reason
    if reason := cluster_unavailable_reason():
        pytest.skip(reason)
    env = {**prepare_comm_op(), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with FakeCluster(2, tmp_path / "cluster") as cluster:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text(cluster.hostfile_text(1))
        port = 18000 + os.getpid() % 1000
        proc = cluster.popen("node1", [str(VENV_BIN / "python"), "-m", "launcher.cli", "serve", "llama-tiny", "--tp",
                                       "2", "--hostfile", str(hostfile), "--port", str(port), "--threads", "1",
                                       "--grace", "3", "--dtype", "fp32", "--out", str(tmp_path / "serve")],
                             env=env | {"LABS_API_KEY": "ssh-key-123"}, cwd=REPO)
        try:
            want = _expected(*reference("llama-tiny"))
            res = cluster.exec("node1", [str(VENV_BIN / "python"), "-c", CLIENT, f"http://127.0.0.1:{port}",
                                         "ssh-key-123", json.dumps(PROMPTS), json.dumps(TOKENS)], timeout=360)
            assert res.returncode == 0, res.stderr[-3000:]
            assert json.loads(res.stdout) == [401, *want]
            assert _serve_ranks(cluster, "node2"), "no rank on node2"
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
        assert proc.returncode == 0, out[-4000:]
        assert "backend ssh" in out and "pdsh" in out and "ssh-key-123" not in out, out[-4000:]
        t_end = time.monotonic() + 20
        while time.monotonic() < t_end and any(_serve_ranks(cluster, h) for h in cluster.hosts):
            time.sleep(0.5)
        assert not any(_serve_ranks(cluster, h) for h in cluster.hosts), "a rank outlived labs serve"
