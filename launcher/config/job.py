"""A job: which task, model, data and hyper-parameters (YAML), typed once as dataclasses.

The YAML file and every `--set key=value` override are checked against these dataclasses:
an unknown key, a value of the wrong type or out of range is a `LabsError` naming the file, the
field, the value and what it must be. A field's range lives next to it (`checked(rule, default)`);
a rule that spans fields lives in the section's `__post_init__` (raising `FieldError`).
Keys under `ds.` in `--set` edit the DeepSpeed config instead (e.g. `ds.zero_optimization.stage=3`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.common.errors import LabsError
from launcher.common.files import is_file, load_yaml, load_yaml_mapping
from launcher.config.hostfile import host_problem
from launcher.config.schema import (
    NAME_RULE,
    PATH_RULE,
    PATHS_RULE,
    SLURM_TIME,
    FieldError,
    Rule,
    _check_value,
    at_least,
    between,
    build_section,
    checked,
    non_empty,
    one_of,
    show,
)


@dataclass
class ModelSection:
    name: str = checked(non_empty("a preset, a hub id or a model folder"), "llama-tiny")
    """A preset (see `labs presets`), a Hugging Face hub id, or a local model folder."""
    tokenizer: str | None = checked(non_empty("a hub id or a folder; leave it out for the model's own"), None)
    """Tokenizer hub id or folder; default: the model's own (or the preset's)."""


@dataclass
class DataSection:
    dataset: str = checked(non_empty("a hub dataset name or 'sample'"), "wikitext")
    """Hub dataset name, or `sample` for the built-in text. Local files take precedence."""
    dataset_config: str | None = checked(non_empty("the hub dataset's configuration, or null"), "wikitext-2-raw-v1")
    data_dir: str | None = checked(PATH_RULE, None)
    """Folder laid out like ../shared/data; default: $LABS_DATA_DIR."""
    train_files: list[str] = checked(PATHS_RULE, factory=list)
    eval_files: list[str] = checked(PATHS_RULE, factory=list)
    text_column: str = checked(non_empty("a column of the data files"), "text")
    """Column holding the text (after `column_names` renames a headerless CSV's columns)."""
    text_columns: list[str] = checked(non_empty("a column of the data files", each=True), factory=list)
    """Several text columns joined with a space (e.g. [title, description]); overrides text_column."""
    label_column: str = checked(non_empty("a column of the data files"), "label")
    """Column holding the class label (classification labs)."""
    label_offset: int = checked(at_least(0, "subtracted from every label so that classes start at 0"), 0)
    """Subtracted from every label so classes start at 0 (AG News CSVs number them 1-4: use 1)."""
    column_names: list[str] = checked(non_empty("a name for each column of a headerless CSV", each=True),
                                      factory=list)
    """Column names for headerless CSV files (the first row is then data, not a header)."""
    block_size: int = checked(at_least(2, "tokens per sequence; the model predicts each next token"), 64)
    """Tokens per training sequence (causal LM); at most the model's positions."""
    max_train_samples: int | None = checked(at_least(1, "samples kept for training; null keeps all"), None)
    max_eval_samples: int | None = checked(at_least(1, "samples kept for evaluation; null keeps all"), None)

    def __post_init__(self) -> None:
        if len(set(self.column_names)) != len(self.column_names):
            raise FieldError("column_names", self.column_names, "each column needs its own name")


SAMPLE_PROMPTS = ("The capital of France is", "Once upon a time")
"""train.sample_prompts' default: two short prompts, continued greedily before and after training."""


@dataclass
class TrainSection:
    epochs: int = checked(at_least(1, "passes over the training data"), 1)
    max_steps: int | None = checked(at_least(1, "optimizer steps; null: as many as the epochs give"), None)
    """Stop after this many optimizer steps (across epochs)."""
    seed: int = checked(Rule(lambda v: 0 <= v < 2**32, "it must be in [0, 2**32) (NumPy's seeds are 32-bit)"), 42)
    log_every: int = checked(at_least(1, "it logs every N steps"), 1)
    eval_every: int = checked(at_least(0, "it evaluates every N steps; 0: at the end of each epoch"), 0)
    """Evaluate every N steps (0: at the end of each epoch); every run also evaluates at step 0 and at the end."""
    sample_prompts: list[str] = checked(non_empty("a prompt the model continues", each=True),
                                        factory=lambda: list(SAMPLE_PROMPTS))
    """Causal-LM labs: prompts answered greedily before and after training (summary.json samples_before /
    samples_after); [] generates none."""
    sample_tokens: int = checked(between(1, 512, "new tokens generated per prompt"), 16)
    save_every: int = checked(at_least(0, "it saves a checkpoint every N steps; 0: only at the end"), 0)
    """Save a DeepSpeed checkpoint every N steps (0: only at the end)."""
    output_dir: str = checked(PATH_RULE, "runs")
    export: bool = True
    """Export the final model in Hugging Face format."""
    compile: bool = False
    """torch.compile the model (DeepSpeed's engine.compile(), inductor); data parallel (ZeRO 0-3) only.
    The first steps pay for the compilation (docs/benchmarks.md has its measured effect)."""
    checkpoint: bool | None = None
    """Keep the run's final checkpoint (null: yes, except for --dry_run). A run stopped early always keeps it."""
    keep_checkpoints: int = checked(at_least(0, "the newest K complete checkpoints are kept; 0: all"), 0)
    """Keep only the newest K complete checkpoints (0: keep all)."""
    max_time: str | int | None = None
    """Save and stop after this much training time (e.g. 3h50m, 90m, or seconds), before a
    scheduler's wall time; the run exits 75 and continues with --resume."""
    stop_grace: int = checked(at_least(1, "seconds the ranks get to save after SIGTERM"), 120)
    """Seconds `labs launch` waits, after SIGTERM/SIGINT, for the ranks to save and exit before it
    ends them (a second signal ends them at once)."""
    # What a DeepSpeed config's "auto" values, and the optimizer and scheduler built when the config has
    # none, are made of (as the HF Trainer fills them from its TrainingArguments); null: its defaults.
    from_scratch: bool | None = None
    """What the run is, which picks the defaults of lr, warm-up and weight decay below: true trains a model that
    starts from random weights (a preset built from config; lr 3e-3, 5 warm-up steps, weight decay 0.01, what the
    shipped configs hard-coded before), false fine-tunes pretrained weights (lr 5e-5 and weight decay 0 as the HF
    Trainer's defaults, 10 warm-up steps). null: from model.name (a preset built from config trains from scratch;
    smollm2-135m, minilm-l6, a model folder or a hub id fine-tunes). It never re-initialises loaded weights."""
    lr: float | None = checked(Rule(lambda v: 0 < v < 10, "a learning rate in (0, 10)"), None)
    """Peak learning rate (null: 3e-3 from scratch, 5e-5 fine-tuning, see from_scratch)."""
    betas: list[float] | None = checked(Rule(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                                             "two numbers in [0, 1), e.g. [0.9, 0.95]"), None)
    eps: float | None = checked(Rule(lambda v: 0 < v < 1, "a small positive number, e.g. 1e-8"), None)
    weight_decay: float | None = checked(Rule(lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.01"), None)
    """AdamW weight decay (null: 0.01 from scratch, 0 fine-tuning)."""
    warmup_steps: int | float | None = checked(Rule(lambda v: (isinstance(v, int) and v >= 0) or 0 < v < 1,
                                                    "warm-up steps >= 0, or a ratio of the run's steps in (0, 1) "
                                                    "(as the HF Trainer reads a float), e.g. 10 or 0.1"), None)
    """Learning-rate warm-up steps, or a ratio (0, 1) of train.max_steps (null: 5 from scratch, 10 fine-tuning)."""
    max_grad_norm: float | None = checked(Rule(lambda v: v >= 0, "a gradient-norm clip >= 0 (0: no clipping)"), None)
    micro_batch: int | None = checked(at_least(1, "samples per rank per forward"), None)
    """train_micro_batch_size_per_gpu when the DeepSpeed config leaves it to "auto"."""
    grad_accum: int | None = checked(at_least(1, "micro-batches per optimizer step"), None)
    bf16: bool | str | None = checked(Rule(lambda v: isinstance(v, bool) or v == "auto",
                                           "true, false, or auto (bf16 where this machine has fast bf16)"), None)
    """bf16 enabled when the DeepSpeed config says "auto" (null: off, as the HF Trainer's default;
    auto: on where the machine computes bf16 fast: a CPU with amx_bf16/avx512_bf16, a CUDA GPU with bf16)."""
    fp16: bool | None = None
    """fp16 enabled when the DeepSpeed config says "auto" (null: off; GPUs only, refused on CPU)."""


@dataclass
class WandbSection:
    enabled: bool = False
    project: str = checked(Rule(lambda v: 0 < len(v) <= 128 and not set(v) & set("/\\#?%:"),
                                "W&B project names have 1-128 characters, none of / \\ # ? % :"),
                           "llm-parallelism-labs")
    entity: str | None = checked(non_empty("a W&B user or team, or null"), None)
    group: str | None = checked(non_empty("null: the run folder name"), None)
    """Ties all ranks of one run; default: the run folder name."""
    tags: list[str] = checked(Rule(lambda v: 0 < len(v) <= 64 and "," not in v,
                                   "W&B tags have 1-64 characters, and no ',' (they are passed joined by ',')",
                                   each=True), factory=list)
    mode: str | None = checked(one_of("online", "offline", "disabled"), None)
    """online | offline | disabled; default: offline unless WANDB_API_KEY is set."""


@dataclass
class ClusterSection:
    """How ranks reach other hosts (backends ssh and slurm); the CLI flags of the same names override."""
    include: str = ""
    """DeepSpeed's syntax: hosts joined by '@', slots after ':' (node1@node2:0,1); only these run."""
    exclude: str = ""
    """Same syntax; these hosts (or slots) do not run. Not together with include."""
    ssh_port: int | None = checked(between(1, 65535, "a TCP port"), None)
    master_addr: str | None = checked(Rule(lambda v: host_problem(v) is None, "it must be a host name or an IP "
                                           "address (not starting with '-', at most 253 characters)"), None)
    """Address of rank 0 that every host can reach; default: DeepSpeed asks the first host (hostname -I)."""
    launcher: str = "pdsh"
    """ssh backend: pdsh (DeepSpeed's default) or openmpi (mpirun; needs mpi4py on every host)."""
    ssh_timeout: int = checked(at_least(1, "seconds each host gets to answer"), 5)
    """Seconds each host gets to answer the ssh check before launch."""
    partition: str | None = checked(Rule(lambda v: bool(v) and not any(c.isspace() for c in v),
                                         "a Slurm partition name: not empty, no spaces"), None)
    """slurm backend: #SBATCH --partition."""
    time: str = checked(Rule(lambda v: bool(SLURM_TIME.fullmatch(v)),
                             "Slurm's formats: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or "
                             "UNLIMITED"), "01:00:00")
    """slurm backend: #SBATCH --time."""
    cpus_per_task: int | None = checked(at_least(1, "CPUs for each node's launcher"), None)
    """slurm backend: CPUs for each node's launcher (all its ranks); default: 1 per rank."""
    num_nodes: int | None = checked(at_least(1, "the first N hosts of the hostfile (DeepSpeed's --num_nodes)"), None)
    """Run on the first N hosts of the hostfile only (--num_nodes)."""
    num_accelerators: int | None = checked(at_least(1, "ranks per host (DeepSpeed's --num_gpus)"), None)
    """Ranks on each host, whatever its slots say (--num_gpus / --num_accelerators)."""
    sbatch_args: list[str] = checked(Rule(lambda v: v.startswith("-"), "each is an sbatch flag such as "
                                          "--account=ml", each=True), factory=list)
    """slurm backend: more sbatch flags (e.g. [--account=ml, --gres=gpu:4])."""


@dataclass
class Job:
    name: str = checked(NAME_RULE, "job")
    """The run's folder under train.output_dir; default: the job file's name."""
    task: str = "fine_tune"
    ds_config: str = checked(PATH_RULE, "ds_configs/zero2.json")
    hostfile: str = checked(PATH_RULE, "hostfiles/localhost")
    backend: str = "auto"
    """auto (local when every host is this machine, else ssh) | local | torchrun | ssh | slurm."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    wandb: WandbSection = field(default_factory=WandbSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    options: dict[str, Any] = field(default_factory=dict)
    """Task-specific options, checked by the task (e.g. LoRA rank for `tinyllama`)."""
    ds: dict[str, Any] = checked(Rule(lambda v: all(k.strip(".") for k in v), "its keys are DeepSpeed "
                                      "config keys, dotted for nested ones (zero_optimization.stage)"),
                                 factory=dict)
    """Overrides merged into the DeepSpeed config (dotted keys allowed)."""
    path: str = "<job>"


def set_field(job: Job, name: str, value: Any, flag: str) -> None:
    """Set a top-level field of a built job from a command-line flag (`--ds-config`), checked like the
    job file's value: "--ds-config: ds_config = '...'; it must be a path ..."."""
    f = next(f for f in dataclasses.fields(Job) if f.name == name)
    _check_value(value, typing.get_type_hints(Job)[name], f, flag, name)
    setattr(job, name, value)


NEEDED_SECTIONS = ("model", "data")
"""Sections whose `null` is refused: they say what is trained on what (a null `train:` takes the defaults)."""


def job_from_dict(data: dict[str, Any], path: str = "<job>") -> Job:
    for key in NEEDED_SECTIONS:
        if isinstance(data, dict) and key in data and data[key] is None:
            raise LabsError(f"{path}: {key}: null (or a '{key}:' line with nothing under it) gives the section no "
                            f"values; write its keys under it (e.g. '{key}: {{name: llama-tiny}}' for model), or "
                            f"remove the line to take the defaults")
    job = build_section(Job, data, path, "")
    job.path = path
    return job


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise LabsError(f"--set {show(item)}: expected KEY=VALUE, for example --set train.epochs=2")
        out.append((key.strip(), load_yaml(raw, f"--set {show(key.strip())[1:-1]}") if raw else None))
    return out


def _apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    if key.startswith("ds."):
        ds = data.setdefault("ds", {})
        if not isinstance(ds, dict):
            raise LabsError(f"--set {key}: the job's 'ds' is not a mapping")
        ds[key[3:]] = value
        return
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise LabsError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = value


def default_name(path: Path) -> str:
    """A job's name when it sets none: its file name, made folder-safe ("my job.yaml" -> my_job)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).lstrip(".-")[:128]
    return name or "job"


def load_job(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Job:
    """Read a job YAML (or the defaults when path is None) and apply `--set` overrides."""
    data: dict[str, Any] = {}
    spath = str(path) if path else "<defaults>"
    if path:
        p = Path(path)
        if not is_file(p):
            jobs = sorted(str(x) for x in Path("jobs").glob("*.yaml"))
            raise LabsError(f"job file {show(spath)} does not exist; ready-made jobs: {', '.join(jobs)}")
        data = load_yaml_mapping(p, "job file")
        if not data:
            raise LabsError(f"{spath}: the job file is empty (or a null document); write at least "
                            f"'task: fine_tune' (see jobs/demo.yaml), or run the lab without --job")
        data.setdefault("name", default_name(p))
    for key, value in parse_overrides(list(overrides)):
        _apply_override(data, key, value)
    job = job_from_dict(data, spath)
    if job.data.data_dir is None and os.environ.get("LABS_DATA_DIR"):
        job.data.data_dir = os.environ["LABS_DATA_DIR"]
    return job


def job_to_dict(job: Job) -> dict[str, Any]:
    d = dataclasses.asdict(job)
    d.pop("path", None)
    return d
