"""The plan as the console shows it: short by default, everything with -v.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from launcher.common.run_dir import REPO
from launcher.common.text import fmt_bytes, mask
from launcher.config.ds.load import precision
from launcher.config.job import job_to_dict
from launcher.launch.advice import plan_lines
from launcher.launch.env import PASS_PREFIXES, PASS_THROUGH
from launcher.launch.make_plan import _changed
from launcher.launch.plan import Plan


def render_short(plan: Plan) -> str:
    """What `labs plan` / `labs launch` print by default: the decisions, in a dozen lines (-v: all)."""
    job, cfg, lay = plan.job, plan.ds_config, plan.layout
    c, hf = job.cluster, plan.hostfile
    opt = cfg.get("optimizer", {})
    autos = [n for n in plan.notes if n.startswith("auto: ")]
    mem = plan.memory()
    lines = [f"== plan: job {job.name!r} ({job.path}): task {job.task}, model {job.model.name}",
             "  changed from the defaults: " + (", ".join(_changed(job)) or "nothing"),
             f"  DeepSpeed config {job.ds_config}: ZeRO-{plan.zero_stage}, {checkpoints_precision(cfg)}, "
             f"optimizer {opt.get('type', '?')}" + (f"; {len(autos)} \"auto\" value(s) resolved (-v lists them)"
                                                   if autos else ""),
             f"  hosts ({job.hostfile}, backend {job.backend}): "
             + ", ".join(f"{h} slots={n}" for h, n in hf.hosts.items())
             + (f", --include {c.include}" if c.include else "") + (f", --exclude {c.exclude}" if c.exclude else "")]
    if job.backend == "ssh":
        lines.append(f"  backend ssh ({c.launcher}): every host must answer ssh and hold {REPO} and this venv")
    elif job.backend == "slurm":
        lines.append(f"  backend slurm: the job script is written to {plan.run_dir}/slurm_job.sh")
    lines += [f"  layout: {lay.describe()}; train_batch_size {cfg['train_batch_size']} = micro batch "
              f"{cfg['train_micro_batch_size_per_gpu']} x grad accum {cfg['gradient_accumulation_steps']} x dp {lay.dp}"]
    if predicted := plan_lines(plan, plan.memory_budget):
        lines += predicted
    elif mem:
        lines.append("  model states per rank: " + ", ".join(
            f"ZeRO-{st}: {fmt_bytes(b)}" + (" <- this config" if st == plan.zero_stage else "") for st, b in mem.items()))
    lines += [f"  {n}" for n in plan.notes if not n.startswith("auto: ")]
    passed = {k: v for k, v in plan.env.items() if k.startswith(PASS_PREFIXES) or k in PASS_THROUGH}
    if passed:
        lines.append("  passed to the ranks: " + " ".join(f"{k}={mask(k, v)}" for k, v in passed.items()))
    lines += [f"  run folder {plan.run_dir}; rendezvous port {plan.master_port}",
              "  command: " + " ".join(plan.command)]
    return "\n".join(lines)


def checkpoints_precision(cfg: dict[str, Any]) -> str:
    return precision(cfg)


def render(plan: Plan, verbose: bool = True) -> str:
    if not verbose:
        return render_short(plan)
    job, cfg, lay = plan.job, plan.ds_config, plan.layout
    lines = ["== job", yaml.safe_dump(job_to_dict(job), sort_keys=False).rstrip(), "",
             f"== DeepSpeed config ({job.ds_config}, after overrides)", json.dumps(cfg, indent=2), "",
             f"== hostfile ({job.hostfile})"]
    c = job.cluster
    lines[-1] += (f", --include {c.include}" if c.include else "") + (f", --exclude {c.exclude}" if c.exclude else "")
    lines += [f"  {h} slots={s}" for h, s in plan.hostfile.hosts.items()]
    if job.backend == "ssh":
        lines.append(f"  backend ssh ({c.launcher}): at launch every host must answer `ssh -o BatchMode=yes "
                     f"-o ConnectTimeout={c.ssh_timeout}` and hold {REPO} and this venv at the same path")
    elif job.backend == "slurm":
        lines.append(f"  backend slurm: {len(plan.hostfile.hosts)} node(s) x {next(iter(plan.hostfile.hosts.values()))}"
                     f" rank(s); Slurm picks the nodes; the job script is written to {plan.run_dir}/slurm_job.sh")
    lines += ["", "== layout", f"  {lay.describe()}",
              f"  train_batch_size {cfg['train_batch_size']} = micro batch "
              f"{cfg['train_micro_batch_size_per_gpu']} x grad accum {cfg['gradient_accumulation_steps']}"
              f" x dp {lay.dp}", ""]
    mem = plan.memory()
    if mem:
        total, largest = plan.params
        lora = (f"; LoRA: {plan.trainable:,} trainable ({100 * plan.trainable / total:.2f}%), the frozen base "
                f"at 2 bytes per parameter" if plan.trainable is not None else "")
        lines.append(f"== model-state memory per rank (params {total:,}, largest layer {largest:,}{lora}; "
                     f"mixed-precision Adam, DeepSpeed's estimator)")
        for stage, b in mem.items():
            mark = "  <- this config" if stage == plan.zero_stage else ""
            lines.append(f"  ZeRO-{stage}: {fmt_bytes(b):>10}{mark}")
    else:
        lines.append(f"== model-state memory: unknown until {job.model.name!r} is loaded")
    if predicted := plan_lines(plan, plan.memory_budget, verbose=True):
        lines += ["", "== peak memory per rank (predicted: launcher/estimate/memory.py)", *predicted]
    if plan.notes:
        lines += [""] + [f"== {n}" for n in plan.notes]
    port = "chosen by you" if plan.port_given else "free now; another is taken if it is lost before the ranks bind it"
    lines += ["", f"== run folder: {plan.run_dir}", f"== rendezvous port: {plan.master_port} ({port})",
              "== environment for the ranks"]
    lines += [f"  {k}={mask(k, v)}" for k, v in plan.env.items()]
    lines += ["", "== command", "  " + " ".join(plan.command)]
    return "\n".join(lines)
