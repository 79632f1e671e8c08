"""Job + DeepSpeed config + hostfile -> the resolved inputs of a run, checked together (used by `labs plan`
AND by every rank, so the two agree): the layout, the batch triad, "auto" filled, DeepSpeed's parser run,
the model and data checked, the memory prediction of this job. No torch at module level.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from launcher.common.errors import LabsError
from launcher.common.files import load_json
from launcher.common.layout import Layout, valid_layouts
from launcher.common.proc import accelerator, extensions_dir
from launcher.common.run_dir import REPO
from launcher.common.text import parse_duration
from launcher.config.ds.auto import hparams_line, job_values, resolve_auto
from launcher.config.ds.load import load_ds_config, offload, resolve_batch, set_dotted, strip_comments, zero_stage
from launcher.config.ds.optim import ops_needed
from launcher.config.ds.validate import check_keys, validate
from launcher.config.hostfile import Hostfile, is_local, load_hostfile, select
from launcher.config.job import Job, load_job, set_field
from launcher.estimate.memory import Prediction, Setup, predict
from launcher.estimate.shape import Shape, count_params, hidden_size_of, layout_dims, lora_params
from launcher.parallel import choose, tensor_parallel_error
from tasks.data_check import check_data_files
from tasks.options import LORA_DEFAULT, check_options
from tasks.presets import PRESETS, VOCAB, model_config
from tasks.registry import DRY_RUN_MODELS, TASKS


def shape_of_job(job) -> Shape | None:
    cfg = model_config(job)
    if cfg is None:
        return None
    vocab = VOCAB[cfg["tokenizer"]] if job.model.name in PRESETS else cfg.get("vocab_size")
    return Shape.of(cfg, vocab) if vocab else None


def trainable_of_job(job) -> int | None:
    if job.task != "tinyllama":
        return None

    cfg = model_config(job)
    opts = job.options
    return lora_params(cfg, opts.get("lora_r", 8), opts.get("lora_target_modules", LORA_DEFAULT)) if cfg else None


def predict_run(job, cfg: dict, layout, baseline: int | None = None) -> Prediction | None:
    shape = shape_of_job(job)
    if shape is None:
        return None
    setup = Setup.of(cfg, layout, job.data.block_size, trainable_of_job(job))
    setup.datasets = not (job.data.dataset == "sample" and not job.data.train_files)
    return Prediction(shape, setup, predict(shape, setup, baseline or 0), "this config")


BACKENDS = ("auto", "local", "torchrun", "ssh", "slurm")


LAUNCHERS = ("pdsh", "openmpi")


def apply_dry_run(job: Job) -> None:
    """A handful of samples, on CPU, offline: built-in text unless local files are given. The job's own
    DeepSpeed config (its ZeRO stage, pipeline, tensor parallel) is kept: a dry run is the same run, smaller."""
    if not job.data.train_files:
        job.data.dataset = "sample"
    job.data.max_train_samples = min(job.data.max_train_samples or 32, 32)
    job.data.max_eval_samples = min(job.data.max_eval_samples or 16, 16)
    job.data.block_size = min(job.data.block_size, 32)
    job.train.max_steps = min(job.train.max_steps or 3, 3)
    job.train.sample_tokens = min(job.train.sample_tokens, 8)  # greedy samples: one forward per token
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


def from_scratch(job: Job) -> tuple[bool, str]:
    """Whether the run trains from scratch (the defaults of lr and warm-up follow), and why: the job's
    train.from_scratch, else the model (a preset built from config has random weights; anything else loads
    pretrained ones)."""
    name, said = job.model.name, job.train.from_scratch
    if said is not None:
        return said, f"{'training from scratch' if said else 'fine-tuning'}: train.from_scratch = {str(said).lower()}"
    if name in PRESETS and not PRESETS[name].get("weights"):
        return True, f"training from scratch: model.name = {name} is built from config with random weights"
    return False, f"fine-tuning: model.name = {name} loads pretrained weights"


def _check_strategy(job: Job, cfg: dict[str, Any], layout: Layout) -> None:
    """The ZeRO stage and train.compile against what the chosen strategy runs with (launcher/parallel)."""
    strategy = choose(layout)
    if zero_stage(cfg) > strategy.max_zero:
        raise LabsError(f"{job.ds_config}: {strategy.fields(layout)} with zero_optimization.stage = {zero_stage(cfg)}; "
                        f"{strategy.name} runs with ZeRO 0-{strategy.max_zero} only (DeepSpeed's pipeline engine): "
                        f"set zero_optimization.stage to {strategy.max_zero} or lower")
    if job.train.compile and not strategy.compile:
        raise LabsError(f"{job.path}: train.compile = true with {layout.describe()} ({strategy.name}): torch.compile "
                        f"runs here for data parallelism (ZeRO 0-3) only; set train.compile to false for this layout")


def _check_model_layout(job: Job, layout: Layout) -> None:
    """Pipeline stages and tensor-parallel size against the model's layers and heads."""
    if layout.pp == 1 and layout.tp == 1 and layout.sp == 1:
        return
    if layout.sp > 1 and job.data.block_size % layout.sp:
        raise LabsError(f"{job.ds_config}: sequence_parallel_size = {layout.sp} does not divide data.block_size = "
                        f"{job.data.block_size} ({job.path}); each rank keeps an equal slice of every sequence: "
                        f"set data.block_size to a multiple of {layout.sp}")
    shape = layout_dims(model_config(job))
    if shape is None:
        return  # a hub model: checked when the ranks load it
    where = f"{job.ds_config} with model.name = {job.model.name!r} ({job.path})"
    strategy = choose(layout)
    if strategy.archs is not None and shape["arch"] not in strategy.archs:
        raise LabsError(f"{where}: {strategy.fields(layout)} ({strategy.name}) applies to model types "
                        f"{', '.join(strategy.archs)}, not {shape['arch']!r}: {strategy.arch_fix}")
    if layout.pp > 1:
        if shape["layers"] and layout.pp > shape["layers"]:
            raise LabsError(f"{where}: pipeline.stages = {layout.pp} is more than the model's "
                            f"{shape['layers']} transformer blocks; each stage needs at least one block: "
                            f"set pipeline.stages <= {shape['layers']}")
    if layout.sp > 1:
        if shape["heads"] and shape["heads"] % layout.sp:
            raise LabsError(f"{where}: sequence_parallel_size = {layout.sp} does not divide the model's "
                            f"{shape['heads']} attention heads (Ulysses gives each rank whole heads); valid layouts "
                            f"for {layout.world} ranks: {'; '.join(valid_layouts(layout.world, shape['heads'], shape['layers']))}")
    if layout.tp > 1 and shape["heads"]:
        why = tensor_parallel_error(layout.tp, shape["heads"], shape["kv_heads"] or shape["heads"], layout.world)
        if why:
            raise LabsError(f"{where}: {why}")


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
    check_options(job, model_config(job))
    ds_path = _abs(job.ds_config)
    cfg = load_ds_config(ds_path)
    for key, value in job.ds.items():
        set_dotted(cfg, key, value)
    cfg = strip_comments(cfg)  # "_comment" keys: accepted, and not passed to DeepSpeed
    check_keys(cfg, job.ds_config)
    if isinstance(cfg.get("compile"), dict) and not job.train.compile:  # DeepSpeed's engine.compile() options
        job.train.compile = True
        notes.append("compile: the config's compile section turns on train.compile (the ranks call DeepSpeed's "
                     "engine.compile(), which reads the section)")
    hf = select(load_hostfile(_abs(job.hostfile)), job.cluster.include, job.cluster.exclude)
    hf = _trim_hosts(hf, job)
    if world is None:  # in a rank the launcher already chose; here the backend must fit the hosts
        _choose_backend(job, hf)
    layout = Layout.from_ds_config(cfg, world or hf.world_size, job.ds_config)
    if on_layout is not None:  # a resume checks the checkpoint's layout before the batch triad
        on_layout(cfg, layout)
    _check_strategy(job, cfg, layout)
    cfg = _add_optimizer(cfg, notes)
    scratch, mode_why = from_scratch(job)
    cfg, resolved = resolve_auto(cfg, job.ds_config, dp=layout.dp, hidden_size=hidden_size_of(model_config(job)),
                                 job_values=job_values(job.train, scratch, mode_why), accelerator=accelerator())
    notes += [f"auto: {r}" for r in resolved]
    notes.append(hparams_line(cfg, resolved, job.train, mode_why))
    cfg = resolve_batch(cfg, layout.dp, job.ds_config)
    notes += [f"DeepSpeed: {w}" for w in validate(cfg, job.ds_config, world=layout.dp,
                                                             accelerator=accelerator())]
    n = job.data.max_train_samples
    if n is not None and n < cfg["train_batch_size"]:
        raise LabsError(f"{job.ds_config}: train_batch_size = {cfg['train_batch_size']} samples per step, but the job "
                        f"reads at most data.max_train_samples = {n}{' (--dry_run)' if dry_run else ''}: not one step; "
                        f"lower train_micro_batch_size_per_gpu / train_batch_size (or set them to \"auto\" and "
                        f"train.micro_batch in the job), or raise data.max_train_samples")
    for op, seconds, built in ops_needed(cfg):
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
        if not offload(cfg)[0]:
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
