"""Resume under another layout (issue 10): `labs launch --resume RUN` with another hostfile (dp size)
and/or ZeRO stage / offload converts the checkpoint once (launcher/py) and continues the run
as if nothing happened: same global batch, same data order, losses within 1e-5 of the uninterrupted run.

One uninterrupted run (1 rank, ZeRO-0) is the reference; a chain of resumes, each from a copy of the
previous run as it was at an earlier step, walks the layouts

    1 rank ZeRO-0 -> 2 ranks ZeRO-3 + offload -> 3 ranks ZeRO-2 -> tensor parallel 2 (ZeRO-1)
      -> 1 rank ZeRO-1 -> 2 pipeline stages (ZeRO-0) -> 2 data-parallel ranks (ZeRO-0)

(dp 1 -> 2 -> 3 -> 1 -> 1 -> 1 -> 2, resumes mid-epoch, epochs crossed after); `labs export` of the
tensor-parallel and pipeline runs' checkpoints equals what those runs exported themselves. LoRA under ZeRO-3 (2 ranks) resumed
on 1 rank ZeRO-0 carries its adapters and their optimizer state, and neither run saves an empty
adapter: with the chain, every stage is read as a source and loaded as a target. Conversions cut short or corrupted are redone; a source that
cannot be read is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_ok, labs, launch, read_metrics

from launcher.checkpoint.convert import check_whole, ensure
from launcher.checkpoint.store import FOLDER, LATEST, META, newest, problem, read_manifest, step_of, write_latest
from launcher.common.errors import LabsError

pytestmark = pytest.mark.distributed

JOB = "jobs/fine_tune_dry_run.yaml"  # tiny Llama, built-in text (32 samples)
N = 14  # global batch 6: 5 steps per epoch; resumes at steps 2, 4, ..., 12: mid-epoch, and 10 at an epoch start
REF = ("--max_steps", str(N), "--epochs", "3", "--set", "train.export=false", "train.save_every=2",
       "ds.train_micro_batch_size_per_gpu=3", "ds.gradient_accumulation_steps=2")
OFFLOAD = ("ds.zero_optimization.offload_optimizer.device=cpu", "ds.zero_optimization.offload_param.device=cpu",
           "ds.zero_force_ds_cpu_optimizer=false")
CHAIN = [  # (name, ranks, --set of the resume, resumed from the previous run at this step)
    ("zero3_offload_2", 2, ("ds.zero_optimization.stage=3", *OFFLOAD), 2),
    ("zero2_3", 3, ("ds.zero_optimization.stage=2",), 4),
    ("tensor_parallel_2", 2, ("ds.zero_optimization.stage=1", "ds.tensor_parallel.autotp_size=2", "train.export=true"), 6),
    ("zero1_1", 1, ("ds.zero_optimization.stage=1",), 8),
    ("pipeline_2", 2, ("ds.zero_optimization.stage=0", "ds.pipeline.stages=2", "train.export=true"), 10),
    ("zero0_2", 2, ("ds.zero_optimization.stage=0",), 12),
]


def _hostfile(folder: Path, slots: int) -> str:
    f = folder / f"hosts{slots}"
    f.write_text(f"localhost slots={slots}\n")
    return str(f)


def as_of(run: Path, step: int, dest: Path) -> Path:
    """A copy of `run` as it was when it had saved `step`: later checkpoints and metrics left out."""
    def ignore(folder, names):
        if Path(folder).name == "checkpoints":
            return [n for n in names if (s := step_of(Path(n))) is not None and s > step]
        return [n for n in names if n == LATEST or n.startswith("consolidated")]
    shutil.copytree(run, dest, ignore=ignore)
    write_latest(dest / "checkpoints", f"step{step}")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))
    for f in ("summary.json",):
        (dest / f).unlink(missing_ok=True)
    return dest


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def assert_continues(run: Path, reference: dict[int, float], after: int) -> None:
    got = losses(run)
    assert sorted(got) == list(range(1, N + 1)), sorted(got)
    for s in range(after + 1, N + 1):
        assert abs(got[s] - reference[s]) <= 1e-5 * abs(reference[s]), (s, got[s], reference[s])


@pytest.fixture(scope="module")
def chain(ds_ops, tmp_path_factory):
    """The reference run, then each resume of the chain; returns (reference folder, {name: folder})."""
    out = tmp_path_factory.mktemp("layout")
    proc, ref = launch(JOB, out, "--hostfile", _hostfile(out, 1), *REF)
    assert_ok(proc)
    runs, prev, outputs = {}, ref, {}
    for name, ranks, sets, step in CHAIN:
        run = as_of(prev, step, out / name)
        proc = labs("launch", "--resume", str(run), "--hostfile", _hostfile(out, ranks), "--set", *sets)
        assert_ok(proc)
        runs[name], prev, outputs[name] = run, run, proc.stdout
    return ref, runs, outputs


def test_reference_is_one_rank_zero0_with_global_batch_6(chain):
    ref, _, _ = chain
    man = newest(ref / "checkpoints")[0]
    assert (man.dp, man.zero_stage, man.global_batch, man.step) == (1, 0, 6, N)


@pytest.mark.parametrize("name", [c[0] for c in CHAIN])
def test_resume_under_another_layout_continues_the_run(chain, name):
    ref, runs, outputs = chain
    run = runs[name]
    _, ranks, sets, step = next(c for c in CHAIN if c[0] == name)
    assert_continues(run, losses(ref), step)
    out = outputs[name]
    assert f"resume: from {run}/checkpoints/step{step}" in out
    assert f"rank 0 converts step{step} once into {run}/checkpoints/step{step}/consolidated/" in out
    assert "MB of disk" in out
    dp = ranks // (2 if "tensor" in name or "pipeline" in name else 1)
    assert ("resume: global batch kept at 6 samples per step" in out) == (dp != 1)  # the run's config: dp 1
    assert problem(run / "checkpoints" / f"step{step}") is None  # converted once, intact
    man = newest(run / "checkpoints")[0]  # the run goes on saving in its new layout
    assert (man.step, man.world, man.global_batch) == (N, ranks, 6)
    assert man.offload == ("offload" in name) and f"stage={man.zero_stage}" in " ".join(sets)
    assert (man.tp, man.pp) == (2 if "tensor" in name else 1, 2 if "pipeline" in name else 1)


@pytest.mark.parametrize("name", ["tensor_parallel_2", "pipeline_2"])
def test_export_of_a_tensor_parallel_or_pipeline_checkpoint_equals_the_runs_own_export(chain, name, tmp_path):
    from safetensors.torch import load_file
    run = chain[1][name]
    proc = labs("export", str(run), "--step", str(N), "--out", str(tmp_path / "exp"))
    assert_ok(proc)
    (mine,), (theirs,) = list((tmp_path / "exp").glob("*.safetensors")), list((run / "hf").glob("*.safetensors"))
    a, b = load_file(mine), load_file(theirs)
    assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)


def test_plan_says_what_will_be_converted(chain, tmp_path):
    ref, _, _ = chain
    run = as_of(ref, 4, tmp_path / "run")
    proc = labs("plan", "--resume", str(run), "--hostfile", _hostfile(tmp_path, 2), "--set",
                "ds.zero_optimization.stage=2")
    assert_ok(proc)
    assert "layout changes (data-parallel size 1 -> 2, ZeRO stage 0 -> 2)" in proc.stdout
    assert "rank 0 converts step4 once" in proc.stdout and "MB of disk" in proc.stdout
    assert "global batch kept at 6 samples per step (gradient_accumulation_steps 2 -> 1)" in proc.stdout
    proc = labs("plan", "--resume", str(run), "--hostfile", _hostfile(tmp_path, 2), "--set",
                "ds.tensor_parallel.autotp_size=2")
    assert_ok(proc)
    assert "layout changes (tensor-parallel size 1 -> 2)" in proc.stdout
    assert not (run / "checkpoints" / "step4" / "consolidated").exists()  # a plan converts nothing


def test_cut_short_or_corrupt_conversion_is_redone_and_bad_source_refused(chain, tmp_path):
    _, runs, _ = chain
    tag = shutil.copytree(runs["zero3_offload_2"] / "checkpoints" / "step2", tmp_path / "checkpoints" / "step2")
    folder = tag / FOLDER
    meta = json.loads((folder / META).read_text())
    man = read_manifest(tag)
    assert problem(tag) is None and meta["trained"] == meta["parameters"] > 0

    (folder / "exp_avg.pt").write_bytes((folder / "exp_avg.pt").read_bytes()[:-10] + b"0123456789")  # corrupt
    assert "checksum" in problem(tag)
    said: list[str] = []
    ensure(tag, man, say=said.append)
    assert "converting step2" in said[0] and problem(tag) is None
    assert json.loads((folder / META).read_text())["files"] == meta["files"]  # the same bytes again

    (folder / META).unlink()  # a conversion cut short before its json (written last)
    (tag / f"{FOLDER}.tmp999").mkdir()
    assert "cut short" in problem(tag)
    ensure(tag, man, say=said.append)
    assert problem(tag) is None and not (tag / f"{FOLDER}.tmp999").exists()

    shutil.rmtree(folder)
    src = tag / "mp_rank_00_model_states.pt"
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])  # a damaged source: refused, nothing written
    with pytest.raises(LabsError, match="cannot be read"):
        ensure(tag, man, say=said.append)
    assert not folder.exists() and not list(tag.glob(f"{FOLDER}*"))


# ---------------------------------------------------------------- LoRA under ZeRO-3

LORA = ("--max_steps", "6", "--epochs", "2", "--ds-config", "ds_configs/zero3.json", "--set", "model.name=llama-tiny",
        "data.block_size=32", "data.max_train_samples=32", "data.max_eval_samples=8", "options.lora_dropout=0.0",
        "options.merge=false", "train.save_every=2")


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    (f,) = list((folder / "hf" / "adapter").glob("*.safetensors"))
    return load_file(f)


@pytest.fixture(scope="module")
def lora_runs(ds_ops, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_layout")
    proc, ref = launch("jobs/tinyllama_lora.yaml", out, *LORA)
    assert_ok(proc)
    run = as_of(ref, 2, out / "resumed")
    proc = labs("launch", "--resume", str(run), "--hostfile", _hostfile(out, 1), "--set", "ds.zero_optimization.stage=0")
    assert_ok(proc)
    return ref, run


def test_lora_zero3_never_saves_an_empty_adapter(lora_runs):
    ref, run = lora_runs
    for folder in (ref, run):
        adapter = _adapter(folder)
        assert adapter and all(t.numel() > 0 for t in adapter.values()), {k: t.shape for k, t in adapter.items()}
        r = json.loads((folder / "hf" / "adapter" / "adapter_config.json").read_text())["r"]
        assert all(r in t.shape for t in adapter.values())
        assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # trained, not zeros


def test_lora_zero3_resumed_on_one_rank_zero0_carries_adapters_and_their_optimizer_state(lora_runs):
    ref, run = lora_runs
    want, got = losses(ref), losses(run)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for s in range(3, 7):
        assert abs(got[s] - want[s]) <= 1e-5 * abs(want[s]), (s, got[s], want[s])
    meta = json.loads((run / "checkpoints" / "step2" / FOLDER / META).read_text())
    assert 0 < meta["trained"] < meta["parameters"]  # the adapters are trained, the base is carried frozen
    a, b = _adapter(ref), _adapter(run)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_a_state_with_an_empty_tensor_is_never_exported():
    """What PEFT's save_pretrained would write off a live ZeRO-3 model: placeholders of 0 elements."""
    state = {"base_model.model.q_proj.lora_A.default.weight": torch.empty(0),
             "base_model.model.q_proj.lora_B.default.weight": torch.ones(4, 8)}
    with pytest.raises(RuntimeError, match="1 tensor\\(s\\) are empty .*lora_A"):
        check_whole(state, "here")
    assert check_whole({"w": torch.ones(2)}, "here")["w"].numel() == 2
