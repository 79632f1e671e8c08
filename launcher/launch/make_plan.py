"""The plan: the three files checked together, the layout, the batch triad, memory, the command.

`make_plan` does every check that can fail before a process starts; `labs plan` prints the
result and `labs launch` prints it and runs it. Nothing here imports torch or DeepSpeed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import yaml

from launcher.checkpoint.store import incomplete, latest_note, layout_key, newest, remove_incomplete, resume_under
from launcher.common.errors import LabsError
from launcher.common.layout import Layout
from launcher.common.proc import free_port
from launcher.common.run_dir import STOP_FILE
from launcher.config.ds.load import offload, precision, zero_stage
from launcher.config.job import Job, job_to_dict, load_job
from launcher.estimate.shape import lora_params
from launcher.launch.backends import build_command
from launcher.launch.env import check_env, deepspeed_env_files, runner_env, write_env_file
from launcher.launch.plan import Plan
from launcher.resolve import _check_model, _check_model_layout, resolve
from tasks.options import LORA_DEFAULT
from tasks.presets import model_config


def make_plan(job_path: str | None, *, ds_config: str | None = None, hostfile: str | None = None,
              sets: list[str] | tuple[str, ...] = (), dry_run: bool = False, resume: str | None = None,
              backend: str | None = None, master_port: int | None = None,
              run_dir: str | None = None) -> Plan:

    notes: list[str] = []
    config_dir = None
    on_layout = None
    if resume:
        rd = find_resume_dir(job_path, sets, resume)
        ckpt_dir = rd / "checkpoints"
        job_path = str(rd / "job.yaml")  # the run's own resolved job; flags apply on top
        ds_config = ds_config or str(rd / "ds_config.json")

        def on_layout(cfg: dict, layout: Layout) -> None:
            now = layout_key(layout.dp, layout.tp, layout.pp, zero_stage(cfg),
                                         precision(cfg), any(offload(cfg)), layout.sp)
            # another layout: converted once at launch, keeping the run's global batch (cfg's triad)
            saved, path, said = resume_under(ckpt_dir, cfg, now, rd, ds_config)
            notes.append(f"resume: from {path} (step {saved.step}, saved {saved.reason})")
            notes.extend(said)
            if note := latest_note(ckpt_dir):
                notes.append(f"resume: {note}")
            if left := incomplete(ckpt_dir):
                notes.append(f"resume: incomplete checkpoint folder(s) {', '.join(p.name for p in left)} "
                             f"(a save cut short) are removed at launch")
        config_dir = rd / "resumes" / dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    job, cfg, hf, layout = resolve(job_path, ds_config=ds_config, hostfile=hostfile, sets=sets,
                                   dry_run=dry_run, backend=backend, on_layout=on_layout, notes=notes)
    params = _check_model(job)
    _check_model_layout(job, layout)
    if resume:
        if sets or ds_config != str(rd / "ds_config.json") or hostfile:
            notes.append(f"resume: command-line changes recorded in {config_dir}/ (the run's own job.yaml and "
                         f"ds_config.json stay as they were)")
    elif run_dir:
        rd = Path(run_dir)
    else:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        rd = Path(job.train.output_dir).resolve() / job.name / stamp  # absolute: ranks may start elsewhere
    trainable = None
    if job.task == "tinyllama" and params and (shape := model_config(job)):
        opts = job.options
        trainable = lora_params(shape, opts.get("lora_r", 8), opts.get("lora_target_modules", LORA_DEFAULT))
        if trainable is not None:
            params = (params[0] + trainable, params[1])  # PEFT's model: base + adapters
    plan = Plan(job=job, ds_config=cfg, hostfile=hf, layout=layout, run_dir=rd, params=params, trainable=trainable,
                dry_run=dry_run, resume=resume, master_port=master_port or free_port(),
                port_given=master_port is not None, config_dir=config_dir, notes=notes)
    cores = len(os.sched_getaffinity(0))
    if job.backend in ("local", "torchrun") and layout.world > cores:
        notes.append(f"warning: {layout.world} ranks on this machine's {cores} core(s): the ranks share cores "
                     f"unbound (DeepSpeed binds ranks to cores only when each gets one); ranks sharing cores "
                     f"were measured here 2.4-3x slower than the same ranks bound to their own cores "
                     f"(DEEPSPEED-CPU.md): fine to see the mechanics, not to measure speed")
    plan.env = runner_env(plan)
    for f, values in deepspeed_env_files():
        notes.append(f"environment: {', '.join(values) or 'nothing'} from {f} (DeepSpeed's .deepspeed_env)")
    check_env(plan.env)
    plan.command = build_command(plan)
    return plan


def find_resume_dir(job_path: str | None, sets, resume: str) -> Path:
    """The run folder to continue: the one named, or the newest run of the job with a complete
    checkpoint (the job file and --set name it through `name` and `train.output_dir`)."""
    if resume != "auto":
        p = Path(resume).expanduser()
        if p.name == "checkpoints":
            p = p.parent
        if not (p / "job.yaml").is_file() or not (p / "ds_config.json").is_file():
            raise LabsError(f"--resume {resume}: not a run folder (it has no job.yaml and ds_config.json); "
                            f"pass a folder under runs/<job>/ that `labs launch` made")
        return p.resolve()
    job = load_job(job_path, sets)
    root = Path(job.train.output_dir) / job.name
    runs = sorted(r for r in root.glob("*") if newest(r / "checkpoints")) if root.is_dir() else []
    if not runs:
        raise LabsError(f"--resume: no run of job {job.name!r} with a complete checkpoint under {root}/; "
                        f"run `labs launch` first or pass --resume RUN_DIR")
    return runs[-1].resolve()


def write_run_files(plan: Plan) -> None:
    """Create the run folder (a new one atomically: a launch in the same second gets `-1`, `-2`, ...)
    and write the resolved job, DeepSpeed config and runner env file into `plan.config_dir`. A resume
    writes them under `RUN/resumes/<time>/` and never rewrites the run's own files."""
    if plan.resume:
        remove_incomplete(plan.run_dir / "checkpoints")
        (plan.run_dir / STOP_FILE).unlink(missing_ok=True)
    else:
        base, n = plan.run_dir, 0
        plan.run_dir.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                plan.run_dir.mkdir()
                break
            except FileExistsError:
                n += 1
                plan.run_dir = base.with_name(f"{base.name}-{n}")
        plan.config_dir = plan.run_dir
        plan.command = build_command(plan)  # the command names the run folder
    plan.config_dir.mkdir(parents=True, exist_ok=True)
    (plan.config_dir / "job.yaml").write_text(yaml.safe_dump(job_to_dict(plan.job), sort_keys=False))
    (plan.config_dir / "ds_config.json").write_text(json.dumps(plan.ds_config, indent=2) + "\n")
    write_env_file(plan.config_dir / "ds_env", plan.env)


def _changed(job: Job) -> list[str]:
    """The job's fields that differ from the built-in defaults, as `section.key=value`."""
    default, mine = job_to_dict(Job()), job_to_dict(job)

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict) and a and b:
            return [x for k in b for x in walk(a.get(k), b[k], f"{prefix}{k}.")]
        return [] if a == b else [f"{prefix[:-1]}={json.dumps(b) if not isinstance(b, str) else b}"]
    shown_elsewhere = ("name=", "ds_config=", "hostfile=", "backend=")
    return [x for x in walk(default, mine, "") if not x.startswith(shown_elsewhere)]
