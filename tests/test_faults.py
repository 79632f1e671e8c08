"""Faults a user on a shared machine meets: a scheduler's SIGTERM, a killed rank, a resume after
overrides, a stale build lock, a busy port, two launches at once, secrets in the environment.

distributed: real DeepSpeed ranks under `labs launch` (local runner and torchrun); the ssh and Slurm
variants of the SIGTERM test live with the other cluster tests (tests/test_cluster_launch.py).
The checkpoint bookkeeping (manifests, `latest`, pruning) is tested on folders made here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, labs, read_metrics, run_dirs, wait_for_steps

from launcher.checkpoint.store import (
    Manifest,
    changes,
    check_resume,
    complete,
    latest_note,
    layout_key,
    newest,
    prune,
    read_manifest,
    remove_incomplete,
    resume_under,
    write_latest,
    write_manifest,
)
from launcher.common.errors import LabsError
from launcher.common.proc import clear_stale_build_locks
from launcher.common.run_dir import EXIT_STOPPED
from launcher.common.text import parse_duration

JOB = "jobs/fine_tune_dry_run.yaml"  # tiny Llama, built-in text, 2 local ranks, ZeRO-0
STEPS = 16
# the SIGTERM runs under ZeRO-2: the resume loads each rank's partition of the optimizer state back into the
# same layout (ZeRO-0's own resume: the ssh and Slurm SIGTERM tests, tests/test_cluster_launch.py)
LONG = ("--epochs", "20", "--max_steps", str(STEPS), "--ds-config", "ds_configs/zero2.json", "--set",
        "train.export=false")


def _popen_launch(out: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", "launch", JOB, "--set",
                             f"train.output_dir={out}", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ | (env or {}))


def _processes_of(run_dir: Path) -> list[int]:
    """Processes whose command line names the run folder (the runner, DeepSpeed's launcher, ranks)."""
    pids = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(run_dir).encode() in p.read_bytes():
                pids.append(int(p.parent.name))
        except OSError:
            continue
    return pids


def _port(output: str) -> str:
    return re.findall(r"rendezvous port (\d+)", output)[-1]


@pytest.fixture(scope="module")
def uninterrupted(ds_ops, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("full")
    proc = labs("launch", JOB, "--set", f"train.output_dir={out}", *LONG)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [r["loss"] for r in read_metrics(run_dirs(out)[-1])]


def _stop_and_resume(tmp_path: Path, uninterrupted: list[float], *backend: str) -> tuple[Path, str]:
    """SIGTERM `labs launch` mid-run: a checkpoint, exit 75, nothing left running, no shm file; then
    `--resume` finishes the run with the losses of the uninterrupted one."""
    out = tmp_path / "runs"
    secret = {"LABS_DB_PASSWD": "hunter2-passwd", "WANDB_ACCESS_CREDENTIALS": "cred-xyz-123"}
    proc = _popen_launch(out, *LONG, *backend, env=secret)
    run_dir = wait_for_steps(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("labs launch still runs 150 s after SIGTERM")
    assert proc.returncode == EXIT_STOPPED, output[-5000:]
    stopped = json.loads((run_dir / "stopped.json").read_text())
    step = stopped["step"]
    assert 2 <= step < STEPS and "STOP file" in stopped["reason"]
    assert f"run stopped after step {step} (SIGTERM to labs launch)" in output
    assert f"--resume {run_dir}" in output
    man = read_manifest(run_dir / "checkpoints" / f"step{step}")
    assert man is not None and (man.step, man.world, man.dp, man.zero_stage) == (step, 2, 2, 2)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{step}"
    assert not _processes_of(run_dir)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{_port(output)}_*"))
    assert "hunter2-passwd" not in output and "cred-xyz-123" not in output
    assert "LABS_DB_PASSWD=***" in output and "WANDB_ACCESS_CREDENTIALS=***" in output
    assert "hunter2-passwd" in (run_dir / "ds_env").read_text()  # the owner-only env file has it

    original = (run_dir / "job.yaml").read_text(), (run_dir / "ds_config.json").read_text()
    # the stop record a minute in the future: as on a file system whose clock runs ahead of this host's
    # (CI's did); the resume must still tell the stop it continues from a stop of its own
    t_ahead = time.time() + 60
    os.utime(run_dir / "stopped.json", (t_ahead, t_ahead))
    proc = labs("launch", "--resume", str(run_dir), *backend, "--set", "train.keep_checkpoints=1")  # an override
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert ((run_dir / "job.yaml").read_text(), (run_dir / "ds_config.json").read_text()) == original
    (resumed_conf,) = list((run_dir / "resumes").glob("*/job.yaml"))
    assert "keep_checkpoints: 1" in resumed_conf.read_text()
    assert [m.step for m, _ in complete(run_dir / "checkpoints")] == [STEPS]  # the override applied
    resumed = read_metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == uninterrupted  # bit-exact, before and after the stop
    return run_dir, output


@pytest.mark.distributed
def test_sigterm_local_saves_stops_and_resumes_bit_exact(uninterrupted, tmp_path):
    run_dir, _ = _stop_and_resume(tmp_path, uninterrupted)
    # another ZeRO stage on resume: the plan says it converts the checkpoint (tests/test_resume_layout.py
    # runs it) and keeps the global batch; the run's files untouched
    before = (run_dir / "ds_config.json").read_text(), (run_dir / "job.yaml").read_text()
    proc = labs("plan", "--resume", str(run_dir), "--ds-config", "ds_configs/cpu_dry_run.json")  # accumulation 1
    assert proc.returncode == 0 and "layout changes (ZeRO stage 2 -> 0)" in proc.stdout, proc.stdout + proc.stderr
    assert "global batch kept at 8 samples per step (gradient_accumulation_steps 1 -> 2)" in proc.stdout
    assert ((run_dir / "ds_config.json").read_text(), (run_dir / "job.yaml").read_text()) == before


@pytest.mark.distributed
def test_sigterm_torchrun_saves_stops_and_resumes_bit_exact(uninterrupted, tmp_path):
    _stop_and_resume(tmp_path, uninterrupted, "--backend", "torchrun")


@pytest.mark.distributed
def test_killed_rank_is_named_with_its_log(ds_ops, tmp_path):
    out = tmp_path / "runs"
    proc = _popen_launch(out, "--epochs", "1000", "--max_steps", "100000", "--set", "train.export=false")
    run_dir = wait_for_steps(proc, out, 2)
    (victim,) = [pid for pid in _processes_of(run_dir)
                 if b"--local_rank=1" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    output, _ = proc.communicate(timeout=90)
    assert time.monotonic() - killed < 60
    assert proc.returncode not in (0, EXIT_STOPPED)
    last = output[output.rindex("run failed with exit code"):]
    assert f"rank 1 on host {os.uname().nodename} ended without a word" in last, output[-3000:]
    assert f"last lines of {run_dir}/logs/rank1.log" in last and "[rank 1]" in last
    assert not _processes_of(run_dir)


@pytest.mark.distributed
def test_max_time_and_stale_lock_in_one_process(ds_ops, tmp_path):
    """A plain process: a build lock left by a killed build is removed (with a message) instead of
    waited on for ever; train.max_time saves and stops with exit 75."""
    import shutil
    ext = tmp_path / "ext"  # a private copy of the built op: other processes clear the shared folder's locks
    shutil.copytree(os.environ["TORCH_EXTENSIONS_DIR"], ext, ignore=shutil.ignore_patterns("lock"))
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.touch()
    proc = subprocess.run([sys.executable, "-m", "launcher.worker", "--job", JOB, "--epochs", "1000", "--max_steps",
                           "100000", "--set", f"train.output_dir={tmp_path}", "train.max_time=4s",
                           "train.export=false"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"TORCH_EXTENSIONS_DIR": str(ext)})
    assert proc.returncode == EXIT_STOPPED, proc.stderr[-4000:]
    assert "removed a stale DeepSpeed build lock" in proc.stdout + proc.stderr and not lock.exists()
    (run_dir,) = run_dirs(tmp_path)
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert "train.max_time (4 s) reached" in stopped["reason"]
    assert newest(run_dir / "checkpoints")[0].step == stopped["step"]


def test_held_build_lock_is_kept_and_dead_one_removed(tmp_path):
    held, dead = tmp_path / "op_a" / "lock", tmp_path / "op_b" / "lock"
    for f in (held, dead):
        f.parent.mkdir()
        f.touch()
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(held)!r}); import time; time.sleep(60)"])
    try:
        time.sleep(1.0)
        said: list[str] = []
        assert clear_stale_build_locks(tmp_path, say=said.append) == [dead]
        assert held.exists() and not dead.exists() and "stale DeepSpeed build lock" in said[0]
    finally:
        holder.kill()


def test_busy_master_port_is_refused_before_anything_is_written(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = labs("launch", JOB, "--master_port", str(port), "--set", f"train.output_dir={tmp_path}")
    assert proc.returncode == 2 and f"--master_port {port} is in use" in proc.stderr, proc.stderr
    assert not run_dirs(tmp_path)


def test_two_launches_in_one_second_get_two_folders(tmp_path):
    from launcher.launch.make_plan import make_plan, write_run_files
    plans = [make_plan(JOB, sets=[f"train.output_dir={tmp_path}"], run_dir=str(tmp_path / "job" / "same"))
             for _ in range(2)]
    for p in plans:
        write_run_files(p)
    assert [p.run_dir.name for p in plans] == ["same", "same-1"]
    assert all(str(p.run_dir) in p.command for p in plans)


def test_secret_names_are_masked_in_the_plan(tmp_path):
    env = {"LABS_DB_PASSWD": "pw-123", "WANDB_ACCESS_CREDENTIALS": "cr-456", "HF_TOKEN": "tk-789",
           "LABS_NOTE": "plain-value"}
    proc = labs("plan", JOB, "-v", "--set", f"train.output_dir={tmp_path}", env=env)  # -v: the whole environment
    assert proc.returncode == 0, proc.stderr
    for k, v in env.items():
        assert (f"{k}=***" in proc.stdout) == (k != "LABS_NOTE") and (v in proc.stdout) == (k == "LABS_NOTE")
    assert "TOKENIZERS_PARALLELISM=false" in proc.stdout


def test_resume_needs_a_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step3").mkdir(parents=True)  # a save cut short: no manifest
    (run / "job.yaml").write_text(f"task: fine_tune\nname: run\ntrain:\n  output_dir: {tmp_path}\n")
    (run / "ds_config.json").write_text((REPO / "ds_configs" / "cpu_dry_run.json").read_text())
    proc = labs("plan", "--resume", str(run))
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr and "step3" in proc.stderr, proc.stderr
    proc = labs("plan", "--resume", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "not a run folder" in proc.stderr


# ---------------------------------------------------------------- checkpoint bookkeeping

def _ckpt(root: Path, step: int, complete: bool = True, stage: int = 2) -> Path:
    d = root / f"step{step}"
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        write_manifest(d, Manifest(step=step, world=2, dp=2, tp=1, pp=1, zero_stage=stage,
                                                           precision="fp32", job_sha="j", config_sha="c"))
    return d


def test_latest_missing_empty_or_dangling_uses_newest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    _ckpt(root, 2)
    _ckpt(root, 4)
    _ckpt(root, 6, complete=False)
    assert newest(root)[0].step == 4
    assert "is missing" in latest_note(root)
    (root / "latest").write_text("")
    assert "is empty" in latest_note(root)
    (root / "latest").write_text("step6")
    assert "an incomplete checkpoint" in latest_note(root)
    (root / "latest").write_text("step9")
    assert "does not exist" in latest_note(root)
    write_latest(root, "step4")
    assert latest_note(root) is None
    assert [p.name for p in remove_incomplete(root)] == ["step6"] and not (root / "step6").exists()


def test_keep_checkpoints_prunes_old_ones(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4):
        _ckpt(root, s)
    _ckpt(root, 0, complete=False)
    gone = prune(root, keep=2)
    assert sorted(p.name for p in gone) == ["step0", "step1", "step2"]
    assert [m.step for m, _ in complete(root)] == [3, 4]


def test_resume_under_another_layout_is_accepted_and_its_changes_named(tmp_path):
    """Every layout change converts at launch (launcher/reshard.py, tests/test_resume_layout.py)."""
    root = tmp_path / "checkpoints"
    _ckpt(root, 5, stage=2)
    now = layout_key(dp=1, tp=2, pp=1, zero_stage=3, precision="bf16", offload=True)
    saved, path = check_resume(root, now, tmp_path)
    assert saved.step == 5 and path == root / "step5" and changes(saved.layout_key(), now) == [
        "data-parallel size", "tensor-parallel size", "ZeRO stage", "offload", "precision"]
    both = layout_key(dp=1, tp=2, pp=2, zero_stage=0, precision="fp32")  # not converted yet
    with pytest.raises(LabsError, match="this launch \\(pipeline stages 2 x tensor-parallel size 2\\)"):
        resume_under(root, {}, both, tmp_path)


@pytest.mark.parametrize("text,seconds", [("3h50m", 13800), ("90m", 5400), ("45s", 45), ("2d", 172800),
                                          ("120", 120), (30, 30), (None, None), ("", None)])
def test_max_time_forms(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["3 hours", "h", "-5", "1x"])
def test_max_time_bad_forms(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_resume_under_another_sequence_parallel_size_is_refused_before_any_rank(tmp_path):
    """A conversion does not change the sequence-parallel size: the plan names it and the fix (it
    used to pass the plan and fail inside DeepSpeed's ranks)."""
    from launcher.checkpoint.store import (
        MANIFEST,
        Manifest,
        check_resume,
        layout_key,
        read_manifest,
        write_latest,
        write_manifest,
    )
    from launcher.common.errors import LabsError
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "step4").mkdir(parents=True)
    m = Manifest(step=4, world=2, dp=1, tp=1, pp=1, sp=2, zero_stage=0, precision="fp32",
                             job_sha="j", config_sha="c", global_batch=4)
    write_manifest(ckpt / "step4", m)
    write_latest(ckpt, "step4")
    now = layout_key(2, 1, 1, 0, "fp32", False, 1)
    with pytest.raises(LabsError, match=r"sequence-parallel size 2 -> 1.*not yet to another sequence-parallel size"):
        check_resume(ckpt, now, tmp_path / "run")
    assert read_manifest(ckpt / "step4").sp == 2
    old = json.loads((ckpt / "step4" / MANIFEST).read_text())
    del old["sp"]  # a manifest written before sp was recorded reads as sp 1
    (ckpt / "step4" / MANIFEST).write_text(json.dumps(old))
    assert read_manifest(ckpt / "step4").sp == 1
