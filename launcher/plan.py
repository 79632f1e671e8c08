"""The plan: the three files checked together, the layout, the batch triad, memory, the command.

`make_plan` does every check that can fail before a process starts; `labs plan` prints the
result and `labs launch` prints it and runs it. Nothing here imports torch or DeepSpeed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher import dsconfig
from launcher.backends import PASS_PREFIXES, PASS_THROUGH
from launcher.errors import LabsError
from launcher.files import load_json
from launcher.hostfile import Hostfile, is_local, load_hostfile, select
from launcher.job import Job, job_to_dict, load_job, set_field
from launcher.layout import Layout
from launcher.masking import mask
from launcher.memory import fmt_bytes, zero_model_state_bytes
from launcher.rank_env import STOP_FILE, accelerator, extensions_dir, free_port, parse_duration
from tasks import DRY_RUN_MODELS, TASKS
from tasks.options import TinyLlamaOptions, check_options
from tasks.presets import PRESETS, VOCAB, count_params, lora_params
from tasks.text_data import check_data_files

REPO = Path(__file__).resolve().parent.parent
LORA_DEFAULT = TinyLlamaOptions().lora_target_modules
BACKENDS = ("auto", "local", "torchrun", "ssh", "slurm")
LAUNCHERS = ("pdsh", "openmpi")


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
        return dsconfig.zero_stage(self.ds_config)

    def memory(self) -> dict[int, int]:
        """Per-rank model-state bytes for every ZeRO stage (this config's offload settings)."""
        if not self.params:
            return {}
        total, largest = self.params
        shard = max(self.layout.tp * self.layout.pp, 1)
        zero_n = self.layout.dp * self.layout.sp  # ZeRO partitions over the replicas and the sequence ranks
        off_opt, off_param = dsconfig.offload(self.ds_config)
        if self.trainable is None:
            return {s: zero_model_state_bytes(s, total // shard, largest, zero_n,
                                              off_opt, off_param) for s in range(4)}
        # LoRA: the estimator's accounting for the adapters only, plus the frozen base's 2-byte
        # weights: replicated below ZeRO-3; partitioned by it, with the largest layer gathered in
        # full (2 bytes: a frozen layer has no gradient buffer)
        frozen = 2 * (total - self.trainable) // shard
        return {s: zero_model_state_bytes(s, self.trainable // shard, 0, zero_n, off_opt, off_param)
                + (frozen // zero_n + 2 * largest if s == 3 else frozen) for s in range(4)}


def apply_dry_run(job: Job) -> None:
    """A handful of samples, on CPU, offline: built-in text unless local files are given. The job's own
    DeepSpeed config (its ZeRO stage, pipeline, tensor parallel) is kept: a dry run is the same run, smaller."""
    if not job.data.train_files:
        job.data.dataset = "sample"
    job.data.max_train_samples = min(job.data.max_train_samples or 32, 32)
    job.data.max_eval_samples = min(job.data.max_eval_samples or 16, 16)
    job.data.block_size = min(job.data.block_size, 32)
    job.train.max_steps = min(job.train.max_steps or 3, 3)
    job.train.epochs = 1
    if job.train.checkpoint is None:  # a dry run keeps no checkpoint unless asked (train.checkpoint=true)
        job.train.checkpoint = False
    if not _is_local_model(job.model.name) and job.model.name not in PRESETS and job.task in DRY_RUN_MODELS:
        job.model.name = DRY_RUN_MODELS[job.task]


def _is_local_model(name: str) -> bool:
    return Path(name).expanduser().is_dir()


def _check_model(job: Job) -> tuple[int, int] | None:
    name = job.model.name
    if name in PRESETS:
        cfg = PRESETS[name]
        return count_params(cfg, VOCAB[cfg["tokenizer"]])
    path = Path(name).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise LabsError(f"{job.path}: model.name = {name!r} is a folder without config.json; "
                            f"point it at a save_pretrained() folder or use a preset: {', '.join(PRESETS)}")
        weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")
                   or p.name.endswith(".index.json")]
        if not weights:
            raise LabsError(f"{job.path}: model.name = {name!r} has config.json but no weights "
                            f"(*.safetensors or *.bin); export the model with save_pretrained()")
        cfg = load_json(cfg_file, f"model config of model.name = {name!r}")
        try:
            return count_params(cfg, cfg["vocab_size"])
        except KeyError:
            return None
    if "/" not in name and not name.replace("-", "").replace("_", "").isalnum():
        raise LabsError(f"{job.path}: model.name = {name!r} is neither a preset, a folder nor a hub id")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise LabsError(
            f"{job.path}: model.name = {name!r} is a Hugging Face hub id and HF_HUB_OFFLINE=1; "
            f"give a local folder (--set model.name=/path/to/model) or a preset "
            f"({', '.join(PRESETS)})"
        )
    return None


PIPELINE_ARCHS = ("llama", "mistral", "gpt2")  # the model types tasks/pipeline_layers.py can cut


def _preset_or_config(job: Job) -> dict[str, Any] | None:
    """The model's config: a preset's dict or a local folder's config.json; None for hub ids."""
    name = job.model.name
    if name in PRESETS:
        return PRESETS[name]
    if (Path(name).expanduser() / "config.json").is_file():
        cfg = load_json(Path(name).expanduser() / "config.json", f"model config of model.name = {name!r}")
        return cfg if isinstance(cfg, dict) else None
    return None


def _model_shape(job: Job) -> dict[str, Any] | None:
    """(arch, layers, heads, kv heads) from a preset or a local config.json; None for hub ids."""
    cfg = _preset_or_config(job)
    if cfg is None:
        return None
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    return {"arch": cfg.get("arch") or cfg.get("model_type"), "heads": heads,
            "layers": cfg.get("num_hidden_layers") or cfg.get("n_layer"),
            "kv_heads": cfg.get("num_key_value_heads") or heads}


def _check_model_layout(job: Job, layout: Layout) -> None:
    """Pipeline stages and tensor-parallel size against the model's layers and heads."""
    if layout.pp == 1 and layout.tp == 1 and layout.sp == 1:
        return
    if layout.sp > 1 and job.data.block_size % layout.sp:
        raise LabsError(f"{job.ds_config}: sequence_parallel_size = {layout.sp} does not divide data.block_size = "
                        f"{job.data.block_size} ({job.path}); each rank keeps an equal slice of every sequence: "
                        f"set data.block_size to a multiple of {layout.sp}")
    shape = _model_shape(job)
    if shape is None:
        return  # a hub model: checked when the ranks load it
    where = f"{job.ds_config} with model.name = {job.model.name!r} ({job.path})"
    if layout.pp > 1:
        if shape["arch"] not in PIPELINE_ARCHS:
            raise LabsError(f"{where}: pipeline.stages = {layout.pp}, but model type {shape['arch']!r} has no "
                            f"pipeline layer list (tasks/pipeline_layers.py knows {', '.join(PIPELINE_ARCHS)}); "
                            f"use a ZeRO or tensor_parallel config for it")
        if layout.tp > 1 and shape["arch"] not in ("llama", "mistral"):
            raise LabsError(f"{where}: pipeline.stages = {layout.pp} with tensor_parallel.autotp_size = {layout.tp}: "
                            f"the stages' blocks are sliced by tasks/tp_layers.py, which knows Llama-family blocks "
                            f"only, not {shape['arch']!r}; use pipeline or tensor parallelism alone for it")
        if shape["layers"] and layout.pp > shape["layers"]:
            raise LabsError(f"{where}: pipeline.stages = {layout.pp} is more than the model's "
                            f"{shape['layers']} transformer blocks; each stage needs at least one block: "
                            f"set pipeline.stages <= {shape['layers']}")
    if layout.sp > 1:
        from launcher.layout import valid_layouts
        if shape["arch"] not in ("llama", "mistral"):
            raise LabsError(f"{where}: sequence_parallel_size = {layout.sp}, but Ulysses attention is wired for "
                            f"Llama-family models only, not {shape['arch']!r}; remove sequence_parallel_size")
        if shape["heads"] and shape["heads"] % layout.sp:
            raise LabsError(f"{where}: sequence_parallel_size = {layout.sp} does not divide the model's "
                            f"{shape['heads']} attention heads (Ulysses gives each rank whole heads); valid layouts "
                            f"for {layout.world} ranks: {'; '.join(valid_layouts(layout.world, shape['heads'], shape['layers']))}")
    if layout.tp > 1:
        for key in ("heads", "kv_heads"):
            n = shape[key]
            if n and n % layout.tp:
                what = "attention heads" if key == "heads" else "key-value heads"
                raise LabsError(f"{where}: tensor_parallel.autotp_size = {layout.tp} does not divide the model's "
                                f"{n} {what}; AutoTP splits whole heads: choose a divisor of {n}")


def _check_data(job: Job) -> None:
    d = job.data
    for key in ("train_files", "eval_files"):
        for f in getattr(d, key):
            if not Path(f).expanduser().is_file():
                raise LabsError(f"{job.path}: data.{key} names {f!r}, which does not exist; "
                                f"fix the path or drop it to use data.dataset")
    if d.data_dir and not Path(d.data_dir).expanduser().is_dir():
        raise LabsError(f"{job.path}: data.data_dir = {d.data_dir!r} is not a folder "
                        f"(set --data_dir / LABS_DATA_DIR to a folder laid out like shared/data)")
    if d.eval_files and not d.train_files:
        raise LabsError(f"{job.path}: data.eval_files given without data.train_files")
    check_data_files(job)


def resolve(job_path: str | None, *, ds_config: str | None = None, hostfile: str | None = None,
            sets: list[str] | tuple[str, ...] = (), dry_run: bool = False,
            world: int | None = None, backend: str | None = None,
            on_layout=None, notes: list[str] | None = None) -> tuple[Job, dict, Hostfile, Layout]:
    """Load and check job, DeepSpeed config and hostfile together. `world` overrides the
    hostfile's world size (inside a rank, where WORLD_SIZE is the truth). What was resolved or
    added for the user ("auto" values, a default optimizer, DeepSpeed's warnings, ops to build)
    is appended to `notes`."""
    notes = [] if notes is None else notes
    job = load_job(job_path, sets)
    if ds_config:
        set_field(job, "ds_config", ds_config, "--ds-config")
    if hostfile:
        set_field(job, "hostfile", hostfile, "--hostfile")
    if backend:
        set_field(job, "backend", backend, "--backend")
    if dry_run:
        apply_dry_run(job)
    if job.task not in TASKS:
        raise LabsError(f"{job.path}: task = {job.task!r} does not exist; tasks: {', '.join(sorted(TASKS))}")
    if job.backend not in BACKENDS:
        raise LabsError(f"{job.path}: backend = {job.backend!r}; choose one of {', '.join(BACKENDS)}")
    if job.cluster.launcher not in LAUNCHERS:
        raise LabsError(f"{job.path}: cluster.launcher = {job.cluster.launcher!r}; choose one of "
                        f"{', '.join(LAUNCHERS)} (--launcher)")
    check_options(job, _preset_or_config(job))
    ds_path = _abs(job.ds_config)
    cfg = dsconfig.load_ds_config(ds_path)
    for key, value in job.ds.items():
        dsconfig.set_dotted(cfg, key, value)
    cfg = dsconfig.strip_comments(cfg)  # "_comment" keys: accepted, and not passed to DeepSpeed
    dsconfig.check_keys(cfg, job.ds_config)
    hf = select(load_hostfile(_abs(job.hostfile)), job.cluster.include, job.cluster.exclude)
    hf = _trim_hosts(hf, job)
    if world is None:  # in a rank the launcher already chose; here the backend must fit the hosts
        _choose_backend(job, hf)
    layout = Layout.from_ds_config(cfg, world or hf.world_size, job.ds_config)
    if on_layout is not None:  # a resume checks the checkpoint's layout before the batch triad
        on_layout(cfg, layout)
    if layout.pp > 1 and dsconfig.zero_stage(cfg) >= 2:
        raise LabsError(f"{job.ds_config}: pipeline.stages = {layout.pp} with zero_optimization.stage = "
                        f"{dsconfig.zero_stage(cfg)}; DeepSpeed's pipeline engine supports ZeRO 0-1 only")
    if job.train.compile and (layout.pp > 1 or layout.tp > 1 or layout.sp > 1):
        raise LabsError(f"{job.path}: train.compile = true with {layout.describe()}: torch.compile runs here for "
                        f"data parallelism (ZeRO 0-3) only; set train.compile to false for this layout")
    cfg = _add_optimizer(cfg, notes)
    t = job.train
    cfg, resolved = dsconfig.resolve_auto(
        cfg, job.ds_config, dp=layout.dp, hidden_size=dsconfig.hidden_size_of(_preset_or_config(job)),
        job_values={"lr": t.lr, "betas": t.betas, "eps": t.eps, "weight_decay": t.weight_decay,
                    "warmup_steps": t.warmup_steps, "total_steps": t.max_steps, "max_grad_norm": t.max_grad_norm,
                    "micro_batch": t.micro_batch, "grad_accum": t.grad_accum, "bf16": t.bf16, "fp16": t.fp16},
        accelerator=accelerator())
    notes += [f"auto: {r}" for r in resolved]
    cfg = dsconfig.resolve_batch(cfg, layout.dp, job.ds_config)
    notes += [f"DeepSpeed: {w}" for w in dsconfig.validate(cfg, job.ds_config, world=layout.dp,
                                                             accelerator=accelerator())]
    n = job.data.max_train_samples
    if n is not None and n < cfg["train_batch_size"]:
        raise LabsError(f"{job.ds_config}: train_batch_size = {cfg['train_batch_size']} samples per step, but the job "
                        f"reads at most data.max_train_samples = {n}{' (--dry_run)' if dry_run else ''}: not one step; "
                        f"lower train_micro_batch_size_per_gpu / train_batch_size (or set them to \"auto\" and "
                        f"train.micro_batch in the job), or raise data.max_train_samples")
    for op, seconds, built in dsconfig.ops_needed(cfg):
        if not built:
            notes.append(f"build: this config needs DeepSpeed's {op} op, not built yet in {extensions_dir()}: "
                         f"the first rank builds it once (about {seconds} s; the rank log says so)")
    _check_data(job)
    try:
        parse_duration(job.train.max_time)
    except ValueError as e:
        raise LabsError(f"{job.path}: train.max_time = {job.train.max_time!r}: {e}") from None
    return job, cfg, hf, layout


def _trim_hosts(hf: Hostfile, job: Job) -> Hostfile:
    """DeepSpeed's runner's --num_nodes (the first N hosts) and --num_gpus / --num_accelerators (N ranks
    on each host); like the runner, neither goes with --include / --exclude."""
    c = job.cluster
    if c.num_nodes is None and c.num_accelerators is None:
        return hf
    if c.include or c.exclude:
        raise LabsError(f"{job.path}: --num_nodes / --num_gpus with --include / --exclude; DeepSpeed's runner "
                        f"refuses the two together: use one of them")
    hosts = dict(hf.hosts)
    if c.num_nodes is not None:
        if c.num_nodes > len(hosts):
            raise LabsError(f"--num_nodes {c.num_nodes}: {hf.path} lists {len(hosts)} host(s) "
                            f"({', '.join(hosts)}); ask for at most {len(hosts)}")
        hosts = dict(list(hosts.items())[:c.num_nodes])
    if c.num_accelerators is not None:
        hosts = dict.fromkeys(hosts, c.num_accelerators)
    return Hostfile(hf.path, hosts)


def _add_optimizer(cfg: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """A config without `optimizer` / `scheduler` (its training script was to build them) gets the ones
    the HF Trainer builds: AdamW and a warm-up schedule, their numbers "auto" from the job's train.*."""
    cfg = dict(cfg)
    if "optimizer" not in cfg:
        params: dict[str, Any] = {k: "auto" for k in ("lr", "betas", "eps", "weight_decay")}
        if not dsconfig.offload(cfg)[0]:
            params["torch_adam"] = True  # torch's AdamW: no C++ build (offload needs DeepSpeed's CPU Adam)
            params["fused"] = True  # its fused kernel: 4.9-5.6x the default for-loop on CPU (docs/benchmarks.md)
        cfg["optimizer"] = {"type": "AdamW", "params": params}
        notes.append("optimizer: the config has none; AdamW from the job (train.lr, train.betas, train.eps, "
                     "train.weight_decay), as the HF Trainer builds one")
    if "scheduler" not in cfg:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto",
                                                           "warmup_num_steps": "auto"}}
        notes.append("scheduler: the config has none; WarmupLR: train.warmup_steps of linear warm-up to "
                     "train.lr, then constant")
    return cfg


def _choose_backend(job: Job, hf: Hostfile) -> None:
    """auto -> local or ssh by the hosts; a backend that cannot reach the hosts is refused."""
    remote = [h for h in hf.hosts if not is_local(h)]
    if job.backend == "auto":
        job.backend = "ssh" if remote else "local"
    if job.backend in ("local", "torchrun") and remote:
        raise LabsError(f"{hf.path}: hosts {', '.join(remote)} are not this machine, but backend = "
                        f"{job.backend!r} starts ranks here only; use --backend ssh (or slurm), or "
                        f"--hostfile hostfiles/localhost")
    if job.backend == "local" and len(hf.hosts) > 1:
        raise LabsError(f"{hf.path}: {len(hf.hosts)} hosts for backend 'local'; list this machine once")
    if job.backend == "slurm" and len(set(hf.hosts.values())) > 1:
        raise LabsError(f"{hf.path}: slots differ between hosts ({', '.join(f'{h}={n}' for h, n in hf.hosts.items())})"
                        f"; with --backend slurm the hostfile gives the shape (one line per node, the same "
                        f"slots = ranks on each) and Slurm picks the nodes")
    if job.cluster.launcher == "openmpi" and (job.cluster.include or job.cluster.exclude):
        raise LabsError(f"{job.path}: --include/--exclude with cluster.launcher = 'openmpi'; DeepSpeed's "
                        f"mpirun runner does not filter hosts: write a hostfile with only the hosts to use")
    if job.backend != "ssh" and job.cluster.launcher != "pdsh":
        raise LabsError(f"{job.path}: cluster.launcher = {job.cluster.launcher!r} applies to --backend ssh only")


def _abs(p: str) -> str:
    """A path as given when it exists from here, else relative to the repository (so jobs work from
    any folder); unchanged when neither exists, so the error shows what the user wrote."""
    path = Path(p).expanduser()
    try:
        keep = path.is_absolute() or path.exists() or not (REPO / path).exists()
    except OSError:  # a name too long for the filesystem: the loader says so with the file's name
        keep = True
    if keep:
        return str(path)
    return str(REPO / path)


def make_plan(job_path: str | None, *, ds_config: str | None = None, hostfile: str | None = None,
              sets: list[str] | tuple[str, ...] = (), dry_run: bool = False, resume: str | None = None,
              backend: str | None = None, master_port: int | None = None,
              run_dir: str | None = None) -> Plan:
    from launcher.backends import build_command, check_env, runner_env

    notes: list[str] = []
    config_dir = None
    on_layout = None
    if resume:
        rd = find_resume_dir(job_path, sets, resume)
        ckpt_dir = rd / "checkpoints"
        job_path = str(rd / "job.yaml")  # the run's own resolved job; flags apply on top
        ds_config = ds_config or str(rd / "ds_config.json")

        def on_layout(cfg: dict, layout: Layout) -> None:
            from launcher import checkpoints
            now = checkpoints.layout_key(layout.dp, layout.tp, layout.pp, dsconfig.zero_stage(cfg),
                                         checkpoints.precision(cfg), any(dsconfig.offload(cfg)), layout.sp)
            # another layout: converted once at launch, keeping the run's global batch (cfg's triad)
            saved, path, said = checkpoints.resume_under(ckpt_dir, cfg, now, rd, ds_config)
            notes.append(f"resume: from {path} (step {saved.step}, saved {saved.reason})")
            notes.extend(said)
            if note := checkpoints.latest_note(ckpt_dir):
                notes.append(f"resume: {note}")
            if left := checkpoints.incomplete(ckpt_dir):
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
    if job.task == "tinyllama" and params and (shape := _preset_or_config(job)):
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
    from launcher.backends import deepspeed_env_files
    for f, values in deepspeed_env_files():
        notes.append(f"environment: {', '.join(values) or 'nothing'} from {f} (DeepSpeed's .deepspeed_env)")
    check_env(plan.env)
    plan.command = build_command(plan)
    return plan


def find_resume_dir(job_path: str | None, sets, resume: str) -> Path:
    """The run folder to continue: the one named, or the newest run of the job with a complete
    checkpoint (the job file and --set name it through `name` and `train.output_dir`)."""
    from launcher import checkpoints
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
    runs = sorted(r for r in root.glob("*") if checkpoints.newest(r / "checkpoints")) if root.is_dir() else []
    if not runs:
        raise LabsError(f"--resume: no run of job {job.name!r} with a complete checkpoint under {root}/; "
                        f"run `labs launch` first or pass --resume RUN_DIR")
    return runs[-1].resolve()


def write_run_files(plan: Plan) -> None:
    """Create the run folder (a new one atomically: a launch in the same second gets `-1`, `-2`, ...)
    and write the resolved job, DeepSpeed config and runner env file into `plan.config_dir`. A resume
    writes them under `RUN/resumes/<time>/` and never rewrites the run's own files."""
    from launcher.backends import build_command, env_file_text
    if plan.resume:
        from launcher import checkpoints
        checkpoints.remove_incomplete(plan.run_dir / "checkpoints")
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
    env_file = plan.config_dir / "ds_env"  # may hold secrets (WANDB_API_KEY): readable by the owner only
    env_file.touch(mode=0o600)
    env_file.write_text(env_file_text(plan.env))


def _changed(job: Job) -> list[str]:
    """The job's fields that differ from the built-in defaults, as `section.key=value`."""
    default, mine = job_to_dict(Job()), job_to_dict(job)

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict) and a and b:
            return [x for k in b for x in walk(a.get(k), b[k], f"{prefix}{k}.")]
        return [] if a == b else [f"{prefix[:-1]}={json.dumps(b) if not isinstance(b, str) else b}"]
    shown_elsewhere = ("name=", "ds_config=", "hostfile=", "backend=")
    return [x for x in walk(default, mine, "") if not x.startswith(shown_elsewhere)]


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
    from launcher.memory import plan_lines
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
    from launcher.checkpoints import precision
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
    from launcher.memory import plan_lines
    if predicted := plan_lines(plan, plan.memory_budget, verbose=True):
        lines += ["", "== peak memory per rank (predicted: launcher/memory.py)", *predicted]
    if plan.notes:
        lines += [""] + [f"== {n}" for n in plan.notes]
    port = "chosen by you" if plan.port_given else "free now; another is taken if it is lost before the ranks bind it"
    lines += ["", f"== run folder: {plan.run_dir}", f"== rendezvous port: {plan.master_port} ({port})",
              "== environment for the ranks"]
    lines += [f"  {k}={mask(k, v)}" for k, v in plan.env.items()]
    lines += ["", "== command", "  " + " ".join(plan.command)]
    return "\n".join(lines)
