"""A job: which task, model, data and hyper-parameters (YAML), typed once as dataclasses.

The YAML file and every `--set key=value` override are checked against these dataclasses:
an unknown key or a value of the wrong type is a `LabsError` naming the file and the field.
Keys under `ds.` in `--set` edit the DeepSpeed config instead (e.g. `ds.zero_optimization.stage=3`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import LabsError


@dataclass
class ModelSection:
    name: str = "llama-tiny"
    """A preset (see `labs presets`), a Hugging Face hub id, or a local model folder."""
    tokenizer: str | None = None
    """Tokenizer hub id or folder; default: the model's own (or the preset's)."""


@dataclass
class DataSection:
    dataset: str = "wikitext"
    """Hub dataset name, or `sample` for the built-in text. Local files take precedence."""
    dataset_config: str | None = "wikitext-2-raw-v1"
    data_dir: str | None = None
    """Folder laid out like ../shared/data; default: $LABS_DATA_DIR."""
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    text_column: str = "text"
    """Column holding the text (after `column_names` renames a headerless CSV's columns)."""
    text_columns: list[str] = field(default_factory=list)
    """Several text columns joined with a space (e.g. [title, description]); overrides text_column."""
    label_column: str = "label"
    """Column holding the class label (classification labs)."""
    label_offset: int = 0
    """Subtracted from every label so classes start at 0 (AG News CSVs number them 1-4: use 1)."""
    column_names: list[str] = field(default_factory=list)
    """Column names for headerless CSV files (the first row is then data, not a header)."""
    block_size: int = 64
    """Tokens per training sequence (causal LM)."""
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class TrainSection:
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps (across epochs)."""
    seed: int = 42
    log_every: int = 1
    eval_every: int = 0
    """Evaluate every N steps (0: at the end of each epoch)."""
    save_every: int = 0
    """Save a DeepSpeed checkpoint every N steps (0: only at the end)."""
    output_dir: str = "runs"
    export: bool = True
    """Export the final model in Hugging Face format."""


@dataclass
class WandbSection:
    enabled: bool = False
    project: str = "llm-parallelism-labs"
    entity: str | None = None
    group: str | None = None
    """Ties all ranks of one run; default: the run folder name."""
    tags: list[str] = field(default_factory=list)
    mode: str | None = None
    """online | offline | disabled; default: offline unless WANDB_API_KEY is set."""


@dataclass
class ClusterSection:
    """How ranks reach other hosts (backends ssh and slurm); the CLI flags of the same names override."""
    include: str = ""
    """DeepSpeed's syntax: hosts joined by '@', slots after ':' (node1@node2:0,1); only these run."""
    exclude: str = ""
    """Same syntax; these hosts (or slots) do not run. Not together with include."""
    ssh_port: int | None = None
    master_addr: str | None = None
    """Address of rank 0 that every host can reach; default: DeepSpeed asks the first host (hostname -I)."""
    launcher: str = "pdsh"
    """ssh backend: pdsh (DeepSpeed's default) or openmpi (mpirun; needs mpi4py on every host)."""
    ssh_timeout: int = 5
    """Seconds each host gets to answer the ssh check before launch."""
    partition: str | None = None
    """slurm backend: #SBATCH --partition."""
    time: str = "01:00:00"
    """slurm backend: #SBATCH --time."""
    cpus_per_task: int | None = None
    """slurm backend: CPUs for each node's launcher (all its ranks); default: 1 per rank."""
    sbatch_args: list[str] = field(default_factory=list)
    """slurm backend: more sbatch flags (e.g. [--account=ml, --gres=gpu:4])."""


@dataclass
class Job:
    name: str = "job"
    task: str = "fine_tune"
    ds_config: str = "ds_configs/zero2.json"
    hostfile: str = "hostfiles/localhost"
    backend: str = "auto"
    """auto (local when every host is this machine, else ssh) | local | torchrun | ssh | slurm."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    wandb: WandbSection = field(default_factory=WandbSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    options: dict[str, Any] = field(default_factory=dict)
    """Task-specific options, checked by the task (e.g. LoRA rank for `tinyllama`)."""
    ds: dict[str, Any] = field(default_factory=dict)
    """Overrides merged into the DeepSpeed config (dotted keys allowed)."""
    path: str = "<job>"


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build(cls: type, data: Any, path: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise LabsError(f"{path}: {prefix or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "path"]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {prefix}{close[0]!r}?" if close else f"known keys: {', '.join(names)}"
            raise LabsError(f"{path}: unknown key {full!r}; {hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path, f"{full}.")
            continue
        if not _type_ok(value, tp):
            tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            raise LabsError(f"{path}: {full} = {value!r} has the wrong type; expected {tname}")
        kwargs[key] = value
    return cls(**kwargs)


def job_from_dict(data: dict[str, Any], path: str = "<job>") -> Job:
    job = _build(Job, data, path, "")
    job.path = path
    return job


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise LabsError(f"--set {item!r}: expected KEY=VALUE, for example --set train.epochs=2")
        out.append((key.strip(), yaml.safe_load(raw) if raw else None))
    return out


def load_job(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Job:
    """Read a job YAML (or the defaults when path is None) and apply `--set` overrides."""
    data: dict[str, Any] = {}
    spath = str(path) if path else "<defaults>"
    if path:
        p = Path(path)
        if not p.is_file():
            jobs = sorted(str(x) for x in Path("jobs").glob("*.yaml"))
            raise LabsError(f"job file {spath!r} does not exist; ready-made jobs: {', '.join(jobs)}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise LabsError(f"{spath}: not valid YAML: {e}") from None
        data.setdefault("name", p.stem)
    for key, value in parse_overrides(list(overrides)):
        if key.startswith("ds."):
            data.setdefault("ds", {})[key[3:]] = value
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LabsError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = value
    job = job_from_dict(data, spath)
    if job.data.data_dir is None and os.environ.get("LABS_DATA_DIR"):
        job.data.data_dir = os.environ["LABS_DATA_DIR"]
    return job


def job_to_dict(job: Job) -> dict[str, Any]:
    d = dataclasses.asdict(job)
    d.pop("path", None)
    return d
