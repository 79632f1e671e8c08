"""The run's checkpoints: which are complete, which one to resume from, and their manifests.

A checkpoint is DeepSpeed's tag folder `checkpoints/step<N>/`. It counts as complete only once
every rank has written its part (a barrier) and rank 0 has added `labs_manifest.json` (step,
world size, layout, ZeRO stage, offload, precision, global batch, hashes of the resolved job and
config); only then is
`checkpoints/latest` rewritten, atomically (write, then rename). Resume loads the newest complete
checkpoint, whatever `latest` says, and tells when the two differ. Incomplete folders (a save cut
short by a kill) are never loaded and are removed before the next run starts.

A resume under another data-parallel size, ZeRO stage, offload or precision converts the checkpoint
once (launcher/py) and keeps the run's global batch (`resume_under`, called by the plan);
another number of pipeline stages or tensor-parallel size converts too (pipeline layers named
through the task's layer list, AutoTP shards joined along their split dimension).

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

from launcher.common.errors import LabsError
from launcher.common.files import sha256_file

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
    offload: bool = False
    """ZeRO offload (optimizer or parameters) to the CPU was on."""
    global_batch: int = 0
    """Samples per optimizer step (micro x accumulation x dp); 0 in manifests written before it was recorded."""
    sp: int = 1
    """Sequence-parallel size (1 in manifests written before it was recorded)."""

    def layout_key(self) -> dict[str, Any]:
        return layout_key(self.dp, self.tp, self.pp, self.zero_stage, self.precision, self.offload, self.sp)


def layout_key(dp: int, tp: int, pp: int, zero_stage: int, precision: str, offload: bool = False,
               sp: int = 1) -> dict[str, Any]:
    """What a checkpoint's files depend on: resuming under another value needs a conversion."""
    return {"data-parallel size": dp, "tensor-parallel size": tp, "pipeline stages": pp,
            "ZeRO stage": zero_stage, "offload": offload, "precision": precision, "sequence-parallel size": sp}


NOT_CONVERTIBLE: tuple[str, ...] = ("sequence-parallel size",)
"""Layout keys a conversion cannot change: the sequence-parallel size (its ranks build their own groups
around DeepSpeed's, launcher/parallel/sequence_parallel.py); dp, tp, pp, ZeRO stage, offload and precision convert."""


def changes(was: dict[str, Any], will: dict[str, Any]) -> list[str]:
    return [k for k in was if k in will and was[k] != will[k]]




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
    difference when one of them cannot be converted (NOT_CONVERTIBLE: the sequence-parallel size)."""
    best = newest(ckpt_dir)
    if best is None:
        left = incomplete(ckpt_dir)
        extra = (f" ({len(left)} incomplete folder(s): {', '.join(p.name for p in left)}; a save was cut short)"
                 if left else "")
        raise LabsError(f"--resume {run_dir}: no complete checkpoint in {ckpt_dir}{extra}; start a new run "
                        f"(without --resume), or resume a run that saved one (train.save_every = N saves every N steps)")
    saved, path = best
    was = saved.layout_key()
    diffs = changes(was, now)
    if any(k in NOT_CONVERTIBLE for k in diffs):
        raise LabsError(f"--resume {run_dir}: checkpoint {path.name} was saved with "
                        + ", ".join(f"{k} {v}" for k, v in was.items())
                        + f"; this launch changes {', '.join(f'{k} {was[k]} -> {now[k]}' for k in diffs)}. "
                        f"A checkpoint converts to another data-parallel size, ZeRO stage, offload, precision, "
                        f"tensor-parallel size or number of pipeline stages, "
                        f"not yet to another {' or '.join(k for k in NOT_CONVERTIBLE if k in diffs)}: keep "
                        f"{', '.join(f'{k} {was[k]}' for k in NOT_CONVERTIBLE if k in diffs)} (the run's own "
                        f"ds_config, {run_dir}/ds_config.json), or start a new run")
    return saved, path


def saved_global_batch(saved: Manifest, run_dir: Path) -> int:
    """The run's samples per optimizer step: from the manifest, else from the run's resolved ds_config."""
    if saved.global_batch:
        return saved.global_batch
    try:
        tb = json.loads((run_dir / "ds_config.json").read_text()).get("train_batch_size")
    except (OSError, ValueError):
        return 0
    return tb if isinstance(tb, int) else 0


def keep_global_batch(cfg: dict[str, Any], global_batch: int, dp: int, path: str) -> list[str]:
    """Set the batch triad of `cfg` (before it is resolved) so that a resume at data-parallel size
    `dp` keeps the run's samples per step: the micro batch stays and gradient accumulation follows
    (or the reverse when it must). A config that names another train_batch_size keeps it, with a
    warning. Returns what it did, for the plan."""
    if global_batch <= 0:
        return []
    tb, mb, ga = (cfg.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                       "gradient_accumulation_steps"))
    num = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if num(tb) and tb != global_batch:
        return [f"warning: {path} sets train_batch_size = {tb}, the run trained with {global_batch}: the resumed "
                f"steps will not be those of the uninterrupted run"]
    cfg["train_batch_size"] = global_batch
    said = []
    if num(mb) and num(ga) and mb * ga * dp != global_batch:
        if global_batch % (mb * dp) == 0:
            cfg["gradient_accumulation_steps"] = global_batch // (mb * dp)
            said.append(f"gradient_accumulation_steps {ga} -> {cfg['gradient_accumulation_steps']}")
        elif global_batch % (ga * dp) == 0:
            cfg["train_micro_batch_size_per_gpu"] = global_batch // (ga * dp)
            said.append(f"train_micro_batch_size_per_gpu {mb} -> {cfg['train_micro_batch_size_per_gpu']}")
        else:
            raise LabsError(f"--resume: the run's global batch of {global_batch} samples cannot be split over "
                            f"data-parallel size {dp} (it is not a multiple of {dp}); choose a hostfile whose "
                            f"data-parallel size divides {global_batch}")
    return [f"resume: global batch kept at {global_batch} samples per step ({', '.join(said)})"] if said else []


def resume_under(ckpt_dir: Path, cfg: dict[str, Any], now: dict[str, Any], run_dir: Path,
                 path: str = "") -> tuple[Manifest, Path, list[str]]:
    """For the plan of a resume: the checkpoint (check_resume), the batch triad of `cfg` set to keep
    the run's global batch when the data-parallel size changes, and what the conversion will do."""
    saved, tag = check_resume(ckpt_dir, now, run_dir)
    was = saved.layout_key()
    diffs = changes(was, now)
    # the data-parallel size may differ from the one the run's config was written for (an earlier resume)
    notes = keep_global_batch(cfg, saved_global_batch(saved, run_dir), now["data-parallel size"], path)
    if not diffs:
        return saved, tag, notes
    both = [f"{which} (pipeline stages {k['pipeline stages']} x tensor-parallel size {k['tensor-parallel size']})"
            for which, k in (("the checkpoint", was), ("this launch", now))
            if k["pipeline stages"] > 1 and k["tensor-parallel size"] > 1]
    if both:
        raise LabsError(f"--resume {run_dir}: {' and '.join(both)} combines pipeline and tensor parallelism, which a "
                        f"conversion does not handle yet; resume under the checkpoint's own layout, or convert "
                        f"through one of the two alone")
    why = problem(tag)
    change = ", ".join(f"{k} {was[k]} -> {now[k]}" for k in diffs)
    if why is None:
        notes.append(f"resume: layout changes ({change}): {tag}/{FOLDER} is already converted: rank 0 "
                     f"checks and reuses it")
    else:
        size, secs = estimate(tag)
        notes.append(f"resume: layout changes ({change}): rank 0 converts {tag.name} once into "
                     f"{tag}/{FOLDER}/ (fp32 weights, Adam moments and step counts, LR schedule, "
                     f"sampler position from the step): about {size / 1e6:.0f} MB of disk, ~{secs:.0f} s")
    return saved, tag, notes


FOLDER = "consolidated"


META = "labs_consolidated.json"


FILES = ("weights.pt", "exp_avg.pt", "exp_avg_sq.pt", "engine.pt")


MOMENTS = ("exp_avg", "exp_avg_sq")


FORMAT = 1


def problem(tag_dir: Path) -> str | None:
    """Why `tag_dir/consolidated/` cannot be used (None: it is complete and intact)."""
    folder = tag_dir / FOLDER
    if not folder.is_dir():
        return "not converted yet"
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return f"{folder / META} is missing or unreadable (a conversion cut short)"
    if meta.get("format") != FORMAT or meta.get("source_step") != step_of(tag_dir):
        return f"{folder / META} describes another conversion"
    for name, want in meta.get("files", {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != want["bytes"]:
            return f"{f} is missing or has another size than when it was written"
        if sha256_file(f) != want["sha256"]:
            return f"{f} does not match its checksum (corrupted)"
    if sorted(meta.get("files", {})) != sorted(FILES):
        return f"{folder / META} lists other files than a conversion writes"
    return None


def estimate(tag_dir: Path) -> tuple[int, float]:
    """(bytes the conversion writes, seconds it takes), roughly: fp32 weights and two moments are
    12 of the 16 bytes per trained parameter a ZeRO checkpoint holds (ZeRO-0: all of them); about
    150 MB/s to read, merge and write on this kind of machine, plus a few seconds of start-up."""
    source = sum(f.stat().st_size for f in tag_dir.glob("*.pt"))
    zero0 = (tag_dir / "mp_rank_00_model_states.pt").is_file() and not list(tag_dir.glob("*optim_states.pt"))
    out = source if zero0 else source * 3 // 4
    return out, 3.0 + (source + out) / 150e6
