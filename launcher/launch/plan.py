"""The plan: a plain value (no commands inside; the backends turn it into commands).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.common.layout import Layout
from launcher.config.ds.load import offload, zero_stage
from launcher.config.hostfile import Hostfile
from launcher.config.job import Job
from launcher.estimate.memory import zero_model_state_bytes


@dataclass
class Plan:
    job: Job
    ds_config: dict[str, Any]
    hostfile: Hostfile
    layout: Layout
    run_dir: Path
    params: tuple[int, int] | None  # (total, largest layer) when known without loading weights
    trainable: int | None = None  # LoRA: the adapters' parameters (the base is frozen)
    dry_run: bool = False
    resume: str | None = None
    master_port: int = 29500
    port_given: bool = False
    """True when the user named the port (--master_port): never changed; else labs may pick another."""
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    config_dir: Path | None = None
    """Where the resolved job.yaml / ds_config.json / ds_env are written and read by the ranks: the run
    folder, or for a resume `RUN/resumes/<time>/`, so the run's original files are never rewritten."""
    notes: list[str] = field(default_factory=list)
    """What the plan decided for the user (resume details, warnings), printed with it."""
    memory_budget: str | None = None
    """--memory SIZE: the memory per rank the prediction is checked against (default: this machine's)."""

    def __post_init__(self) -> None:
        if self.config_dir is None:
            self.config_dir = self.run_dir

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)

    def memory(self) -> dict[int, int]:
        """Per-rank model-state bytes for every ZeRO stage (this config's offload settings)."""
        if not self.params:
            return {}
        total, largest = self.params
        shard = max(self.layout.tp * self.layout.pp, 1)
        zero_n = self.layout.dp * self.layout.sp  # ZeRO partitions over the replicas and the sequence ranks
        off_opt, off_param = offload(self.ds_config)
        if self.trainable is None:
            return {s: zero_model_state_bytes(s, total // shard, largest, zero_n,
                                              off_opt, off_param) for s in range(4)}
        # LoRA: the estimator's accounting for the adapters only, plus the frozen base's 2-byte
        # weights: replicated below ZeRO-3; partitioned by it, with the largest layer gathered in
        # full (2 bytes: a frozen layer has no gradient buffer)
        frozen = 2 * (total - self.trainable) // shard
        return {s: zero_model_state_bytes(s, self.trainable // shard, 0, zero_n, off_opt, off_param)
                + (frozen // zero_n + 2 * largest if s == 3 else frozen) for s in range(4)}


def worker_args(plan: Plan) -> list[str]:
    """The worker reads the resolved job and DeepSpeed config from the run folder."""
    conf = ["--config_dir", str(plan.config_dir)] if plan.config_dir != plan.run_dir else []
    return ["--run_dir", str(plan.run_dir), *conf] + (["--resume"] if plan.resume else [])
