"""The slurm backend: scripts/slurm_job.sh rendered for the plan (srun starts one DeepSpeed launcher per node).
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

from launcher.common.run_dir import REPO
from launcher.common.text import mask
from launcher.launch.plan import Plan, worker_args


def slurm_command(plan: Plan) -> list[str]:
    """sbatch the job script `labs launch` renders into the run folder (see render_slurm_script)."""
    return [shutil.which("sbatch") or "sbatch", "--parsable", str(plan.run_dir / "slurm_job.sh")]


SLURM_TEMPLATE = REPO / "scripts" / "slurm_job.sh"


def render_slurm_script(plan: Plan) -> str:
    """scripts/slurm_job.sh with this plan's #SBATCH values and settings: nodes and ranks per node
    from the hostfile's shape, the worker reading this run folder, the ranks' environment
    (secrets are not written: sbatch hands the submitting shell's environment to the job)."""
    c, hf = plan.job.cluster, plan.hostfile
    procs = next(iter(hf.hosts.values()))
    sbatch = {"job-name": f"labs-{plan.job.name}", "nodes": str(len(hf.hosts)), "ntasks-per-node": "1",
              "cpus-per-task": str(c.cpus_per_task or procs), "time": c.time,
              "output": str(plan.run_dir / "logs" / "slurm-%j.out")}
    if c.partition:
        sbatch["partition"] = c.partition
    settings = {"LABS_REPO": str(REPO), "LABS_BIN": str(Path(sys.executable).parent),
                "PROCS_PER_NODE": str(procs), "MASTER_PORT": str(plan.master_port),
                "LABS_WORKER_ARGS": " ".join(shlex.quote(a) for a in worker_args(plan))}
    settings |= {k: v for k, v in plan.env.items() if mask(k, v) == v}
    header = [f"#SBATCH --{k}={v}" for k, v in sbatch.items()] + [f"#SBATCH {a}" for a in c.sbatch_args]
    out = []
    for line in SLURM_TEMPLATE.read_text().splitlines():
        m = re.match(r"#SBATCH --([a-z-]+)=", line)
        if m and m[1] in sbatch:  # the template's defaults, replaced by this plan's header
            if header:
                out += header
                header = []
            continue
        if line == "# @labs-settings":
            out.append(f"# rendered by `labs launch --backend slurm` for {plan.run_dir}")
            out += [f"export {k}={shlex.quote(v)}" for k, v in settings.items()]
            continue
        out.append(line)
    return "\n".join(out) + "\n"
