"""The equivalence harness: a parallel run equals ONE rank over real updates.

Every run is `labs launch jobs/demo.yaml` (llama-tiny, the built-in text, blocks of 32 tokens, seed 42)
with a strategy's ds_config, the same global batch of 8 sequences, STEPS optimizer updates over two
epochs, fp32, and a learning rate above 0 from the first update (warm-up from 1e-3 to 3e-3: with the
shipped `warmup_min_lr: 0`, DeepSpeed's first two updates run at lr 0, docs/DEEPSPEED-CPU trap 17).
`compare` then reads, at EVERY step, the training loss and the global gradient norm before clipping
(`grad_norm` in metrics.jsonl), the final evaluation loss, and the exported Hugging Face weights.

Why the gradient norm: AdamW divides each update by the root of its own squared-gradient average, so a
gradient that is off by a constant factor gives almost the same update, and clipping renormalises the
rest; the loss alone misses such an error. The norm is measured where the gradient is used.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO, assert_ok, launch, read_metrics

STEPS = 10  # 5 global batches of 8 per epoch of the built-in text: two epochs, 10 real updates
JOB = "jobs/demo.yaml"
COMMON = ("model.name=llama-tiny", "data.dataset=sample", "data.block_size=32", f"train.max_steps={STEPS}",
          "train.epochs=2", "train.eval_every=0", "train.export=true", "train.checkpoint=false",
          "ds.scheduler.params.warmup_min_lr=0.001", "ds.optimizer.params.fused=true")
FAULTS = REPO / "tests" / "faults"  # sitecustomize.py: a fault planted in one rank's collectives


def hostfile(folder: Path, slots: int) -> str:
    f = folder / f"hosts{slots}"
    f.write_text(f"localhost slots={slots}\n")
    return str(f)


def run(out: Path, ds_config: str, ranks: int, *sets: str, fault: dict[str, str] | None = None,
        timeout: int = 600) -> Path:
    """One `labs launch` of the common job under `ds_config` on `ranks` local ranks; returns its run folder.
    `fault`: LABS_FAULT* variables for tests/faults/sitecustomize.py (put first on the ranks' PYTHONPATH).
    `timeout`: seconds for the whole launch (SmolLM2's 3-rank runs took 7-9 minutes on the loaded 2 cores)."""
    out.mkdir(parents=True, exist_ok=True)
    env = None
    if fault:
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")])), **fault}
    proc, run_dir = launch(JOB, out, "--hostfile", hostfile(out, ranks), "--ds-config", ds_config,
                           "--set", *COMMON, *sets, env=env, timeout=timeout)
    assert_ok(proc)
    # DeepSpeed's CPU comm op leaves a 66 MiB /dev/shm workspace per rank (named by the run's port): the
    # ranks remove theirs (other runs on the machine may hold their own meanwhile)
    port = re.search(r"rendezvous port (\d+)", proc.stdout).group(1)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return run_dir


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a - b)


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "hf" / "model.safetensors"))


@dataclass
class Diff:
    """Largest relative differences of a run from the 1-rank reference."""

    loss: float  # over every step's training loss and the final evaluation loss
    grad_norm: float  # over every step's gradient norm before clipping
    params: float  # over the exported tensors: |a - b| / |b| (Frobenius norms)
    first_step: dict[str, int | None]  # the first step whose loss / grad norm is off by more than tol

    def worst(self) -> float:
        return max(self.loss, self.grad_norm, self.params)

    def __str__(self) -> str:
        return f"loss {self.loss:.2e}, grad norm {self.grad_norm:.2e}, params {self.params:.2e}"


def compare(run_dir: Path, ref_dir: Path, tol: float = 1e-5, noise: dict[str, slice] | None = None) -> Diff:
    """`noise`: parts of tensors whose gradient is zero in exact arithmetic (GPT-2's key bias: softmax ignores
    a shift shared by all keys), so that Adam turns rounding noise into their values in both runs; they are
    left out of the weights' comparison, and must stay below 1e-4 in both."""
    got, want = read_metrics(run_dir), read_metrics(ref_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for rows in (got, want):  # real updates: lr > 0 from the first; the norm logged at every step
        assert all(r["lr"] > 0 and r["grad_norm"] is not None and math.isfinite(r["grad_norm"]) for r in rows)
    losses = [_rel(a["loss"], b["loss"]) for a, b in zip(got, want, strict=True)]
    norms = [_rel(a["grad_norm"], b["grad_norm"]) for a, b in zip(got, want, strict=True)]
    ev = _rel(read_metrics(run_dir, "eval")[-1]["eval_loss"], read_metrics(ref_dir, "eval")[-1]["eval_loss"])
    a, b = weights(run_dir), weights(ref_dir)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    assert all(a[k].shape == b[k].shape for k in b), {k: (a[k].shape, b[k].shape) for k in b if a[k].shape != b[k].shape}
    for k, part in (noise or {}).items():
        assert max(float(a[k][part].norm()), float(b[k][part].norm())) < 1e-4, (k, a[k][part].norm(), b[k][part].norm())
        a[k], b[k] = a[k].clone(), b[k].clone()
        a[k][part] = b[k][part] = 0
    params = max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp(min=1e-30)) for k in b)
    first = {name: next((i + 1 for i, d in enumerate(ds) if d > tol), None)
             for name, ds in (("loss", losses), ("grad_norm", norms))}
    return Diff(max(losses + [ev]), max(norms), params, first)


def assert_equivalent(run_dir: Path, ref_dir: Path, tol: float, noise: dict[str, slice] | None = None,
                      params_tol: float | None = None) -> Diff:
    """Every step's loss and gradient norm, the evaluation and the final weights within `tol` relative
    (`params_tol`: another bound for the weights alone, where a test states the measurement behind it)."""
    d = compare(run_dir, ref_dir, tol, noise)
    ptol = tol if params_tol is None else params_tol
    assert max(d.loss, d.grad_norm) <= tol and d.params <= ptol, \
        f"{run_dir.name} differs from 1 rank: {d} (tolerance {tol:.0e}, weights {ptol:.0e}; first step off: " \
        f"{d.first_step})"
    print(f"\n{run_dir}: {d}")
    return d


def assert_caught(run_dir: Path, ref_dir: Path, tol: float, factor: float = 10.0) -> Diff:
    """A planted fault: the equivalence check must FAIL, by `factor` x its tolerance at least."""
    d = compare(run_dir, ref_dir, tol)
    assert d.worst() > factor * tol, f"the planted fault went unnoticed: {d} (tolerance {tol:.0e})"
    print(f"\nfault caught in {run_dir}: {d} (tolerance {tol:.0e})")
    return d
