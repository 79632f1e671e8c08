"""The run's checkpoints: which are complete, which one to resume from, and their manifests.

A checkpoint is DeepSpeed's tag folder `checkpoints/step<N>/`. It counts as complete only once
every rank has written its part (a barrier) and rank 0 has added `labs_manifest.json` (step,
world size, layout, ZeRO stage, precision, hashes of the resolved job and config); only then is
`checkpoints/latest` rewritten, atomically (write, then rename). Resume loads the newest complete
checkpoint, whatever `latest` says, and tells when the two differ. Incomplete folders (a save cut
short by a kill) are never loaded and are removed before the next run starts.

No torch here: `labs plan` reads manifests to check a resume before any rank starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.errors import LabsError

MANIFEST = "labs_manifest.json"
LATEST = "latest"


@dataclass(frozen=True)
class Manifest:
    step: int
    world: int
    dp: int
    tp: int
    pp: int
    zero_stage: int
    precision: str
    job_sha: str
    config_sha: str
    reason: str = "scheduled"
    """Why it was saved: scheduled (save_every / end of run) or the stop reason (signal, max_time)."""

    def layout_key(self) -> dict[str, Any]:
        return layout_key(self.dp, self.tp, self.pp, self.zero_stage, self.precision)


def layout_key(dp: int, tp: int, pp: int, zero_stage: int, precision: str) -> dict[str, Any]:
    """What a checkpoint's files depend on: resuming under another value cannot load them."""
    return {"data-parallel size": dp, "tensor-parallel size": tp, "pipeline stages": pp,
            "ZeRO stage": zero_stage, "precision": precision}


def precision(cfg: dict[str, Any]) -> str:
    for key in ("bf16", "bfloat16", "fp16"):
        sec = cfg.get(key)
        if isinstance(sec, dict) and sec.get("enabled") is True:
            return "bf16" if key != "fp16" else "fp16"
    return "fp32"


def sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_of(path: Path) -> int | None:
    name = path.name
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else None


def read_manifest(path: Path) -> Manifest | None:
    try:
        data = json.loads((path / MANIFEST).read_text())
        return Manifest(**data)
    except (OSError, ValueError, TypeError):
        return None


def complete(ckpt_dir: Path) -> list[tuple[Manifest, Path]]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        if p.is_dir() and step_of(p) is not None and (m := read_manifest(p)) is not None:
            out.append((m, p))
    return sorted(out, key=lambda mp: mp[0].step)


def incomplete(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir()
                  if p.is_dir() and step_of(p) is not None and read_manifest(p) is None)


def newest(ckpt_dir: Path) -> tuple[Manifest, Path] | None:
    found = complete(ckpt_dir)
    return found[-1] if found else None


def latest_note(ckpt_dir: Path) -> str | None:
    """A sentence when `latest` is missing, empty or names something other than the newest complete
    checkpoint (resume then uses the newest complete one); None when they agree."""
    best = newest(ckpt_dir)
    if best is None:
        return None
    f = ckpt_dir / LATEST
    try:
        tag = f.read_text().strip()
    except OSError:
        return f"{f} is missing: resuming from the newest complete checkpoint, {best[1].name}"
    if not tag:
        return f"{f} is empty: resuming from the newest complete checkpoint, {best[1].name}"
    if tag != best[1].name:
        what = "an incomplete checkpoint" if (ckpt_dir / tag).is_dir() else "a folder that does not exist"
        return f"{f} names {tag!r}, {what}: resuming from the newest complete checkpoint, {best[1].name}"
    return None


def write_manifest(tag_dir: Path, manifest: Manifest) -> None:
    _atomic_write(tag_dir / MANIFEST, json.dumps(asdict(manifest), indent=2) + "\n")


def write_latest(ckpt_dir: Path, tag: str) -> None:
    _atomic_write(ckpt_dir / LATEST, tag)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prune(ckpt_dir: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (0: keep all); remove older ones and any
    incomplete folder older than the newest complete one. Returns what was removed."""
    found = complete(ckpt_dir)
    gone = []
    if keep > 0:
        for _, p in found[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    if found:
        newest_step = found[-1][0].step
        for p in incomplete(ckpt_dir):
            if (step_of(p) or 0) < newest_step:
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def remove_incomplete(ckpt_dir: Path) -> list[Path]:
    """Before ranks start: no rank is writing, so every folder without a manifest is a leftover."""
    gone = incomplete(ckpt_dir)
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def check_resume(ckpt_dir: Path, now: dict[str, Any], run_dir: Path) -> tuple[Manifest, Path]:
    """The checkpoint to resume from, checked against this launch's layout; a LabsError names every
    difference that the checkpoint's files cannot follow (until they can be resharded)."""
    best = newest(ckpt_dir)
    if best is None:
        left = incomplete(ckpt_dir)
        extra = (f" ({len(left)} incomplete folder(s): {', '.join(p.name for p in left)}; a save was cut short)"
                 if left else "")
        raise LabsError(f"--resume {run_dir}: no complete checkpoint in {ckpt_dir}{extra}; start a new run "
                        f"(without --resume), or resume a run that saved one (train.save_every = N saves every N steps)")
    saved, path = best
    was, will = saved.layout_key(), now
    diffs = [f"{k} {was[k]} -> {will[k]}" for k in was if was[k] != will[k]]
    if diffs:
        raise LabsError(f"--resume {run_dir}: checkpoint {path.name} was saved with "
                        + ", ".join(f"{k} {v}" for k, v in was.items())
                        + f"; this launch changes {', '.join(diffs)}, which that checkpoint cannot be loaded "
                        f"under. Resume with the run's own ds_config ({run_dir}/ds_config.json) and hostfile, "
                        f"or start a new run")
    return saved, path
