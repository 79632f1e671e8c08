"""Load, resolve and check a DeepSpeed JSON config before any rank starts: what `labs plan`
accepts must run under `deepspeed.initialize`; what it refuses says what to change.

The order the plan uses: `load_ds_config` -> overrides (`set_dotted`) -> `strip_comments` ->
`resolve_auto` -> `resolve_batch` -> `validate` (and `ops_needed` for the plan to print).

Where each decision comes from (DeepSpeed 0.19, read in its source; nothing kept by hand that the
installed DeepSpeed can answer):
- Accepted keys, types and ranges: DeepSpeed's own parser. `validate` builds `DeepSpeedConfig` (and
  through it every pydantic sub-config) on the resolved dict, for the data-parallel world the plan
  gives, without a process group. Its errors (pydantic ValidationError, AssertionError,
  DeepSpeedConfigError, ValueError) become one LabsError naming file, dotted field, value and fix.
- Unknown keys: DeepSpeed ignores unknown top-level keys, and unknown keys inside its older dict-style
  sections (flops_profiler, checkpoint, data_types, optimizer, ...), silently. The accepted keys are
  the ones the installed `DeepSpeedConfig` looks up, recorded with a tracking dict (`_Tracked`), plus
  the two that `deepspeed.initialize` reads itself. Pydantic sections forbid unknown keys themselves.
- Strict types: DeepSpeed's pydantic models run in lax mode, where `"enabled": "yes"` becomes True and
  `"stage": true` becomes ZeRO-1. Here a bool field takes only true/false and a number field no bool,
  read off the field annotations of the installed models (and the defaults of the dict-style ones).
- "auto": resolved where the HF Trainer resolves it (transformers/integrations/deepspeed.py,
  `HfTrainerDeepSpeedConfig.trainer_config_process` and `trainer_config_finalize`), from the job, the
  model's hidden size and the layout; its defaults are `TrainingArguments`' (`JOB_DEFAULTS`). DeepSpeed's
  pydantic models drop any other "auto" silently (their default applies), so any other is refused.
- Sections DeepSpeed accepts but labs does not honour: `REFUSED`, each with the reason read in
  deepspeed/runtime/engine.py and the fix; a section that is switched off is harmless.
- Optimizer and scheduler: mirrored from `DeepSpeedEngine._configure_basic_optimizer`,
  `get_optimizer_configuration` and `_scheduler_from_config`: which class each type builds on this
  accelerator, its parameters bound to that class, values checked by torch's own constructors.
- Precision: fp16 on CPU refused (no fast fp16 kernels on CPUs); bf16 on a CPU only with avx512_bf16
  or amx_bf16 in /proc/cpuinfo.
- Op builds: `ops_needed`, with the one-time JIT build times measured in shared/DEEPSPEED-CPU.md.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib.util
import inspect
import json
import logging
import math
import os
import types
import typing
from collections.abc import Iterator, KeysView
from pathlib import Path
from typing import Any

from launcher import files
from launcher.errors import LabsError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


# ---------------------------------------------------------------- loading and small helpers

def load_ds_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not files.is_file(p):
        raise LabsError(
            f"DeepSpeed config {str(path)!r} does not exist; pass --ds-config with one of "
            f"{sorted(str(x) for x in Path('ds_configs').glob('*.json')) or 'ds_configs/*.json'}"
        )
    cfg = files.load_json(p, "DeepSpeed config")
    if not isinstance(cfg, dict):
        raise LabsError(f"{path}: the top level must be a JSON object, got {type(cfg).__name__}")
    return cfg


def strip_comments(cfg: Any) -> Any:
    """A copy without the keys that start with `_` (comments, at any depth): accepted and ignored,
    never seen by DeepSpeed."""
    if isinstance(cfg, dict):
        return {k: strip_comments(v) for k, v in cfg.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(cfg, list):
        return [strip_comments(v) for v in cfg]
    return cfg


def check_keys(cfg: dict[str, Any], path: str) -> None:
    """Top-level keys the installed DeepSpeed does not read (it would ignore them silently), and a
    ZeRO section that is not an object or a stage that is not 0-3. Imports DeepSpeed (~2 s)."""
    cfg = strip_comments(cfg)
    known = accepted_keys()
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "remove it"
            raise LabsError(
                f"{path}: unknown top-level key {key!r} (DeepSpeed would ignore it silently); {hint}"
            )
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise LabsError(f"{path}: zero_optimization = {zero!r}; it must be an object like {{\"stage\": 2}}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise LabsError(
            f"{path}: zero_optimization.stage = {stage!r}; ZeRO stage must be 0, 1, 2 or 3"
            + (" (a number: DeepSpeed would read true as 1)" if isinstance(stage, bool) else "")
        )


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def offload(cfg: dict[str, Any]) -> tuple[bool, bool]:
    """(optimizer offloaded to CPU, params offloaded to CPU)."""
    zero = cfg.get("zero_optimization", {})

    def on(section: str) -> bool:
        return (zero.get(section) or {}).get("device", "none") in ("cpu", "nvme")

    return on("offload_optimizer"), on("offload_param")


def _int_or_none(cfg: dict[str, Any], key: str, path: str) -> int | None:
    v = cfg.get(key)
    if v is None or v == "auto":
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise LabsError(f"{path}: {key} = {v!r}; it must be a positive integer or \"auto\"")
    if v > MAX_BATCH:
        shown = f"{v}" if len(str(v)) <= 20 else f"a {len(str(v))}-digit number"
        raise LabsError(f"{path}: {key} = {shown}; more than {MAX_BATCH:,} samples cannot be a batch "
                        f"(torch indexes a batch with 32-bit sizes); set a number of samples per step")
    return v


MAX_BATCH = 2**31 - 1


def resolve_batch(cfg: dict[str, Any], dp: int, path: str) -> dict[str, Any]:
    """Fill the batch triad (train_batch = micro x grad_accum x dp) and check it multiplies out.

    Missing or "auto" values are derived from the others; with two of three missing,
    gradient_accumulation_steps defaults to 1. Returns a new dict with all three set.
    """
    out = copy.deepcopy(cfg)
    tb, mb, ga = (_int_or_none(cfg, k, path) for k in BATCH_KEYS)
    if tb is None and mb is None:
        raise LabsError(
            f"{path}: neither train_batch_size nor train_micro_batch_size_per_gpu is a number (both missing "
            f"or \"auto\" with no micro batch from the job); set train_micro_batch_size_per_gpu (and "
            f"optionally gradient_accumulation_steps)"
        )
    if mb is None:
        ga = ga or 1
        if tb % (ga * dp):
            raise LabsError(
                f"{path}: train_batch_size = {tb} is not divisible by gradient_accumulation_steps "
                f"x data-parallel size = {ga} x {dp}; set train_batch_size to a multiple of {ga * dp}"
            )
        mb = tb // (ga * dp)
    elif ga is None:
        if tb is None:
            ga = 1
        elif tb % (mb * dp):
            raise LabsError(
                f"{path}: train_batch_size = {tb} is not divisible by micro batch x data-parallel "
                f"size = {mb} x {dp}; set train_batch_size to a multiple of {mb * dp}"
            )
        else:
            ga = tb // (mb * dp)
    if tb is None:
        tb = mb * ga * dp
    if tb != mb * ga * dp:
        raise LabsError(
            f"{path}: train_batch_size = {tb} but train_micro_batch_size_per_gpu x "
            f"gradient_accumulation_steps x data-parallel size = {mb} x {ga} x {dp} = {mb * ga * dp}; "
            f"set train_batch_size to {mb * ga * dp} (or \"auto\"), or change the micro batch or "
            f"accumulation steps"
        )
    out.update(train_batch_size=tb, train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=ga)
    return out


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = d[k] = {}
        d = nxt
    d[keys[-1]] = value


def _get(d: Any, keys: tuple[str, ...], default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _dotted(keys: tuple | list) -> str:
    return ".".join(str(k) for k in keys)


def _walk(node: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, value) of every value under node, depth first; list items get their index."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,), v
            yield from _walk(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,), v
            yield from _walk(v, prefix + (i,))


# ---------------------------------------------------------------- "auto", as the HF Trainer fills it

JOB_DEFAULTS: dict[str, Any] = {
    "lr": 5e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "warmup_steps": 0,
    "total_steps": None, "max_grad_norm": 1.0, "micro_batch": 8, "grad_accum": 1, "bf16": False, "fp16": False,
}
"""What `resolve_auto` takes from `job_values`, with the HF Trainer's defaults (TrainingArguments:
learning_rate, adam_beta1/2, adam_epsilon, weight_decay, warmup_steps, max_steps (no default: the
Trainer counts the data), max_grad_norm, per_device_train_batch_size, gradient_accumulation_steps,
bf16, fp16) for keys the job leaves out or sets to None."""

JOB_FIELDS: dict[str, str] = {
    "lr": "train.lr", "betas": "train.betas", "eps": "train.eps", "weight_decay": "train.weight_decay",
    "warmup_steps": "train.warmup_steps", "total_steps": "train.max_steps", "max_grad_norm": "train.max_grad_norm",
    "micro_batch": "train.micro_batch", "grad_accum": "train.grad_accum", "bf16": "train.bf16", "fp16": "train.fp16",
}
"""The job field each job_values key comes from, as the notes name it."""

DS_NATIVE_AUTO = frozenset({"pipeline.stages", "data_types.keep_in_fp32_modules"})
"""Keys where "auto" is DeepSpeed's own value (its defaults; tests check them against DeepSpeed)."""

HIDDEN_KEYS = {  # DeepSpeed's field name and its alias both count
    "reduce_bucket_size": ("hidden*hidden", lambda h: h * h),
    "stage3_prefetch_bucket_size": ("0.9*hidden*hidden", lambda h: int(0.9 * h * h)),
    "prefetch_bucket_size": ("0.9*hidden*hidden", lambda h: int(0.9 * h * h)),
    "stage3_param_persistence_threshold": ("10*hidden", lambda h: 10 * h),
    "param_persistence_threshold": ("10*hidden", lambda h: 10 * h),
}


def hidden_size_of(model_config: dict[str, Any] | None) -> int | None:
    """The hidden size "auto" bucket sizes are computed from, read from a model's config dict (a preset
    or config.json) in the HF Trainer's order: hidden_size (GPT-2's n_embd / d_model are what its
    config objects alias to it), the largest of hidden_sizes, then the same in text_config."""
    for c in (model_config or {}, (model_config or {}).get("text_config") or {}):
        for key in ("hidden_size", "n_embd", "d_model"):
            if isinstance(c.get(key), int):
                return c[key]
        if isinstance(c.get("hidden_sizes"), list) and c["hidden_sizes"]:
            return max(c["hidden_sizes"])
    return None


def find_auto(cfg: Any) -> list[str]:
    """Dotted keys whose value is "auto", except where "auto" is DeepSpeed's own value."""
    return [_dotted(p) for p, v in _walk(cfg) if v == "auto" and _dotted(p) not in DS_NATIVE_AUTO]


def _refuse_auto(cfg: dict[str, Any], path: str) -> None:
    left = find_auto(cfg)
    if left:
        raise LabsError(
            f"{path}: {left[0]} = \"auto\", which nothing resolves"
            + (f" (nor {', '.join(left[1:])})" if len(left) > 1 else "")
            + "; DeepSpeed would silently use its default. \"auto\" is filled only where the HF Trainer "
            "fills it (the batch triad, optimizer lr/betas/eps/weight_decay, scheduler warmup_min_lr/"
            "warmup_max_lr/warmup_num_steps/total_num_steps, gradient_clipping, fp16/bf16 enabled, "
            "zero_optimization reduce_bucket_size/stage3_prefetch_bucket_size/"
            "stage3_param_persistence_threshold); write a value there"
        )


def resolve_auto(cfg: dict[str, Any], path: str, *, dp: int, hidden_size: int | None,
                 job_values: dict[str, Any], accelerator: str = "cpu") -> tuple[dict[str, Any], list[str]]:
    """The config with every "auto" resolved, and one note per value filled ("optimizer.params.lr =
    5e-05 (auto, from the job's train.lr)"). Keys of `job_values` (see JOB_DEFAULTS / JOB_FIELDS):
    lr, betas, eps, weight_decay, warmup_steps, total_steps (optimizer steps of the run), max_grad_norm,
    micro_batch, grad_accum, bf16, fp16; a missing or None one takes the HF Trainer's default.
    `dp` is the data-parallel size, `hidden_size` the model's (None when unknown before loading).
    Any "auto" the HF Trainer would not fill is a LabsError naming the key. Comment keys are dropped."""
    out = strip_comments(cfg)
    notes: list[str] = []
    unknown = set(job_values) - set(JOB_DEFAULTS)
    if unknown:
        raise TypeError(f"resolve_auto: unknown job_values keys {sorted(unknown)}; expected {sorted(JOB_DEFAULTS)}")

    def job(key: str) -> tuple[Any, str]:
        value = job_values.get(key)
        if value is not None:
            return value, f"from the job's {JOB_FIELDS[key]}"
        return JOB_DEFAULTS[key], f"the HF Trainer's default; set {JOB_FIELDS[key]} in the job to choose"

    def fill(keys: tuple[str, ...], value: Any, why: str) -> None:
        node = _get(out, keys[:-1])
        node[keys[-1]] = value
        notes.append(f"{_dotted(keys)} = {value!r} ({why})")

    def is_auto(keys: tuple[str, ...]) -> bool:
        return _get(out, keys) == "auto"

    # the batch triad: the job's micro batch and accumulation when the config has none
    tb_k, mb_k, ga_k = BATCH_KEYS

    def unset(k: str) -> bool:
        return out.get(k) is None or out.get(k) == "auto"

    def why(k: str, how: str) -> str:
        return f"{'auto' if is_auto((k,)) else 'not set'}{how}"

    if unset(mb_k) and unset(tb_k):
        value, src = job("micro_batch")
        fill((mb_k,), value, why(mb_k, f", {src}"))
    if unset(ga_k) and (unset(tb_k) or unset(mb_k)):
        value, src = job("grad_accum")
        fill((ga_k,), value, why(ga_k, f", {src}"))
    tb, mb, ga = (out.get(k) for k in BATCH_KEYS)
    if unset(tb_k) and _positive(mb) and _positive(ga):
        fill((tb_k,), mb * ga * dp, why(tb_k, f": micro batch {mb} x grad accum {ga} x data-parallel {dp}"))
    elif unset(mb_k) and _positive(tb) and _positive(ga) and tb % (ga * dp) == 0:
        fill((mb_k,), tb // (ga * dp), why(mb_k, f": train_batch_size {tb} / (grad accum {ga} x data-parallel {dp})"))
    elif unset(ga_k) and _positive(tb) and _positive(mb) and tb % (mb * dp) == 0:
        fill((ga_k,), tb // (mb * dp), why(ga_k, f": train_batch_size {tb} / (micro batch {mb} x data-parallel {dp})"))

    if is_auto(("gradient_clipping",)):
        value, src = job("max_grad_norm")
        fill(("gradient_clipping",), value, f"auto, {src}")

    lr, lr_src = job("lr")
    params = ("optimizer", "params")
    if isinstance(_get(out, params), dict):
        for key, jkey in (("lr", "lr"), ("betas", "betas"), ("eps", "eps"), ("weight_decay", "weight_decay")):
            if is_auto(params + (key,)):
                value, src = job(jkey)
                fill(params + (key,), list(value) if key == "betas" else value, f"auto, {src}")

    sched = ("scheduler", "params")
    if isinstance(_get(out, sched), dict):
        if is_auto(sched + ("warmup_min_lr",)):
            fill(sched + ("warmup_min_lr",), 0, "auto, 0 as the HF Trainer sets it")
        if is_auto(sched + ("warmup_max_lr",)):
            fill(sched + ("warmup_max_lr",), lr, f"auto, the learning rate, {lr_src}")
        total, total_src = job("total_steps")
        if is_auto(sched + ("total_num_steps",)):
            if total is None:
                raise LabsError(
                    f"{path}: scheduler.params.total_num_steps = \"auto\" needs the number of optimizer steps of "
                    f"the run, which the plan knows only from the job's {JOB_FIELDS['total_steps']}; set it "
                    f"(--set {JOB_FIELDS['total_steps']}=N) or write a number here"
                )
            fill(sched + ("total_num_steps",), int(total), f"auto, {total_src}")
        if is_auto(sched + ("warmup_num_steps",)):
            warm, warm_src = job("warmup_steps")
            if isinstance(warm, float) and 0 < warm < 1:  # a ratio, as HF's get_warmup_steps reads it
                if total is None:
                    raise LabsError(f"{path}: scheduler.params.warmup_num_steps = \"auto\" with a warmup ratio "
                                    f"{warm} needs {JOB_FIELDS['total_steps']}; set it, or give warmup steps")
                warm = math.ceil(total * warm)
            fill(sched + ("warmup_num_steps",), max(1, int(warm)),
                 f"auto, max(1, {warm}), {warm_src}; DeepSpeed 0.19 refuses 0 warmup steps")

    for section, jkey in (("fp16", "fp16"), ("bf16", "bf16"), ("bfloat16", "bf16")):
        if is_auto((section, "enabled")):
            value, src = job(jkey)
            if value == "auto":  # the job leaves it to the machine
                value, src = machine_bf16(accelerator), f"{src} = auto: {machine_bf16_reason(accelerator)}"
            fill((section, "enabled"), bool(value), f"auto, {src}")

    zero = out.get("zero_optimization")
    if isinstance(zero, dict):
        autos = [k for k in HIDDEN_KEYS if zero.get(k) == "auto"]
        if autos and hidden_size is None:
            raise LabsError(
                f"{path}: zero_optimization.{autos[0]} = \"auto\" is computed from the model's hidden size "
                f"({HIDDEN_KEYS[autos[0]][0]}, as the HF Trainer does), which is unknown until this model is "
                f"loaded (a hub model); write a number there, e.g. 5e7"
            )
        for k in autos:
            formula, fn = HIDDEN_KEYS[k]
            fill(("zero_optimization", k), fn(hidden_size), f"auto, {formula} with the model's hidden size {hidden_size}")

    _refuse_auto(out, path)
    return out, notes


def _positive(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


# ---------------------------------------------------------------- sections labs does not honour

REFUSED: dict[str, tuple[str, str]] = {
    "autotuning": (
        "DeepSpeed's autotuner is a separate tool that launches many trial runs and picks a config; inside a "
        "training run the section only changes what the flops profiler records",
        "run `deepspeed --autotuning tune ...` on its own, and remove the section (or set \"enabled\": false) here"),
    "data_efficiency": (
        "curriculum learning and data sampling act only on DeepSpeed's own data loader (training_data given to "
        "deepspeed.initialize), which labs' ranks do not use, and random-LTD needs DeepSpeed's layer replacement "
        "in the model; both would be ignored",
        "remove the section (or set \"enabled\": false)"),
    "hybrid_engine": (
        "the hybrid engine switches a model between training and generation for RLHF (DeepSpeed-Chat); labs' "
        "tasks do not generate while training",
        "remove the section (or set \"enabled\": false)"),
    "compile": (
        "DeepSpeed compiles (torch.compile / DeepCompile) only when the script calls engine.compile(), which "
        "labs' ranks do not",
        "remove the section"),
    "weight_quantization": (
        "it is read by deepspeed.init_inference only (quantized inference weights); training ignores it",
        "remove the section"),
    "expert_parallel": (
        "AutoEP converts Mixture-of-Experts layers, and the labs' models are dense",
        "remove the section"),
    "use_data_before_expert_parallelism": (
        "it orders the process groups of Mixture-of-Experts models, and the labs' models are dense",
        "remove the key"),
    "data_parallel_size": (
        "with sequence_parallel_size it builds a (data, sequence) mesh for Ulysses sequence parallelism; labs "
        "sets it from the hostfile's world size / (sequence_parallel_size x tensor x pipeline)",
        "remove the key"),
    "dataloader_drop_last": (
        "it applies to DeepSpeed's own data loader, which labs' ranks do not use (the task's loader decides)",
        "remove the key"),
}
"""Keys DeepSpeed 0.19 accepts that labs would not honour: reason and fix. Harmless when switched off
("enabled": false, a false/null value, or a section whose values are all false/null/0)."""


def wants_activation_checkpointing(cfg: dict[str, Any]) -> bool:
    """An `activation_checkpointing` section that is not all off: the engine then recomputes activations in
    the backward pass (HF gradient checkpointing under data / tensor parallel; every transformer block of
    a pipeline stage under the pipeline engine, unless pipeline.activation_checkpoint_interval says)."""
    return "activation_checkpointing" in cfg and not _harmless(cfg["activation_checkpointing"])


def _harmless(value: Any) -> bool:
    if value is None or value is False or value == {} or value == []:
        return True
    if isinstance(value, dict):
        if "enabled" in value:
            return value["enabled"] is False
        return all(_harmless(v) or v == 0 for v in value.values())
    return False


# ---------------------------------------------------------------- DeepSpeed's parser, tracked

_MISSING = object()


class _Log:
    def __init__(self) -> None:
        self.seen: dict[tuple, Any] = {}  # key path -> the default DeepSpeed passed (or _MISSING)
        self.bulk: set[tuple] = set()  # dicts DeepSpeed iterated (passed whole, e.g. to a pydantic model)
        self.last: tuple = ()


class _Keys(KeysView):
    def __contains__(self, key: object) -> bool:
        self._mapping._see(key, _MISSING)
        return dict.__contains__(self._mapping, key)

    def __iter__(self):
        self._mapping._log.bulk.add(self._mapping._path)
        return dict.__iter__(self._mapping)


class _Tracked(dict):
    """A dict that records which keys DeepSpeed's parser looks up (with the default it passes) and
    which dicts it consumes whole; nested dicts are wrapped as they are read."""

    def __init__(self, data: dict, path: tuple, log: _Log):
        super().__init__(data)
        self._path, self._log = path, log

    def _see(self, key: Any, default: Any) -> None:
        self._log.seen.setdefault(self._path + (key,), default)
        self._log.last = self._path + (key,)

    def _child(self, key: Any, value: Any) -> Any:
        if isinstance(value, dict) and not isinstance(value, _Tracked):
            value = _Tracked(value, self._path + (key,), self._log)
            dict.__setitem__(self, key, value)
        return value

    def __getitem__(self, key):
        self._see(key, _MISSING)
        return self._child(key, dict.__getitem__(self, key))

    def get(self, key, default=None):
        self._see(key, default)
        return self._child(key, dict.__getitem__(self, key)) if dict.__contains__(self, key) else default

    def __contains__(self, key):
        self._see(key, _MISSING)
        return dict.__contains__(self, key)

    def keys(self):
        return _Keys(self)

    def __iter__(self):
        self._log.bulk.add(self._path)
        return dict.__iter__(self)

    def items(self):
        self._log.bulk.add(self._path)
        return dict.items(self)

    def values(self):
        self._log.bulk.add(self._path)
        return dict.values(self)


@contextlib.contextmanager
def _deepspeed(accelerator: str):
    """Import DeepSpeed's config code quietly: its accelerator choice from `accelerator` when
    DS_ACCELERATOR is unset (else it logs its guess to stdout), its log records collected, not printed."""
    unset = "DS_ACCELERATOR" not in os.environ
    if unset:
        os.environ["DS_ACCELERATOR"] = accelerator
    try:
        from deepspeed.utils import logger
        records: list[logging.LogRecord] = []
        handlers, level = logger.handlers[:], logger.level

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        logger.handlers = [Collect(logging.WARNING)]
        logger.setLevel(logging.WARNING)
        try:
            yield records
        finally:
            logger.handlers, logger.level = handlers, level
    finally:
        if unset:
            os.environ.pop("DS_ACCELERATOR", None)


# _parse's tracking state of the last call, for error messages when DeepSpeed raises part-way
_last_models: list[tuple[type, dict]] = []
_last_log = _Log()


def _parse(cfg: dict[str, Any], world: int) -> tuple[Any, _Log, list[tuple[type, dict]]]:
    """DeepSpeedConfig built on a copy of cfg for a data-parallel world of `world`, with no process
    group: a subclass whose world_size ignores the 1 DeepSpeed falls back to without one. Returns the
    config object, what it looked up, and every pydantic sub-config built (class, data); the last
    two stay in _last_log / _last_models when DeepSpeed raises part-way."""
    global _last_models, _last_log
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    class PlanConfig(DeepSpeedConfig):
        world_size = property(lambda self: world, lambda self, value: None)

    log, models = _Log(), []
    _last_log, _last_models = log, models
    original = DeepSpeedConfigModel.__init__

    def recording(self, strict=False, **data):
        models.append((type(self), data))
        original(self, strict, **data)

    DeepSpeedConfigModel.__init__ = recording
    try:
        parsed = PlanConfig(_Tracked(copy.deepcopy(cfg), (), log))
    finally:
        DeepSpeedConfigModel.__init__ = original
    return parsed, log, models


@functools.lru_cache(maxsize=1)
def _minimal_parse() -> tuple[frozenset[str], dict[str, Any]]:
    """Top-level keys the installed DeepSpeedConfig looks up on a minimal config, and their defaults."""
    from launcher.rank_env import accelerator
    with _deepspeed(accelerator()):
        _, log, _ = _parse({"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1}, 1)
    top = {p[0]: d for p, d in log.seen.items() if len(p) == 1}
    return frozenset(top) | INITIALIZE_KEYS, top


INITIALIZE_KEYS = frozenset({"sequence_parallel_size", "data_parallel_size"})
"""Top-level keys deepspeed.initialize reads itself (deepspeed/__init__.py), outside DeepSpeedConfig."""


def accepted_keys() -> frozenset[str]:
    """Every top-level key the installed DeepSpeed reads (its removed legacy keys included: it looks
    them up to refuse them)."""
    return _minimal_parse()[0]


def __getattr__(name: str) -> Any:
    if name == "KNOWN_KEYS":  # the old hand-kept list, now read off the installed DeepSpeed
        return accepted_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _find_section(cfg: dict[str, Any], data: dict) -> tuple | None:
    """The path of the dict in cfg equal to `data` (what DeepSpeed passed to a pydantic model)."""
    if not data:
        return None
    if cfg == data:
        return ()
    for p, v in _walk(cfg):
        if isinstance(v, dict) and v == data:
            return p
    return None


def _unwrap(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return annotation


def _model_field(cls: type, key: str) -> Any:
    fields = cls.model_fields
    if key in fields:
        return fields[key]
    return next((f for f in fields.values() if f.alias == key), None)


def _model_at(cls: type | None, loc: tuple) -> type | None:
    """The pydantic model class at loc under cls (None when loc leaves the models)."""
    from pydantic import BaseModel
    for key in loc:
        f = _model_field(cls, str(key)) if cls is not None else None
        inner = _unwrap(f.annotation) if f else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return None
        cls = inner
    return cls


def _model_keys(cls: type | None, loc: tuple) -> list[str]:
    """Field names and aliases of the pydantic model at loc under cls."""
    cls = _model_at(cls, loc)
    if cls is None:
        return []
    names = []
    for name, f in cls.model_fields.items():
        names += [name] + ([f.alias] if f.alias else [])
    return names


def _strict_types(cls: type, data: dict, prefix: tuple, path: str) -> None:
    """Refuse what DeepSpeed's lax pydantic parsing would turn silently into something else: a
    non-boolean for a bool field ("enabled": "yes"), a boolean for a number field ("stage": true)."""
    from pydantic import BaseModel
    for key, value in data.items():
        f = _model_field(cls, str(key))
        ann = _unwrap(f.annotation) if f else None
        if not isinstance(ann, type):
            continue
        where = f"{path}: {_dotted(prefix + (key,))} = {value!r}"
        if ann is bool and not isinstance(value, bool):
            raise LabsError(f"{where} is not a JSON boolean; DeepSpeed's parser would quietly read it as "
                            f"true or false (or refuse it); write true or false")
        if issubclass(ann, (int, float)) and not issubclass(ann, bool) and isinstance(value, bool):
            default = f.get_default() if not f.is_required() else None
            default = getattr(default, "value", default)
            raise LabsError(f"{where} is a boolean where DeepSpeed expects a number (it would read true as 1 "
                            f"and false as 0); write the number"
                            + (f" (DeepSpeed's default: {default!r})" if default is not None else ""))
        if issubclass(ann, BaseModel) and isinstance(value, dict):
            _strict_types(ann, value, prefix + (key,), path)


def _strict_defaults(cfg: dict[str, Any], seen: dict[tuple, Any], path: str) -> None:
    """The same for DeepSpeed's dict-style keys, typed by the default DeepSpeed passes when reading them."""
    for keys, default in seen.items():
        if default is _MISSING or default is None or isinstance(default, (dict, list)):
            continue
        value = _get(cfg, keys, _MISSING)
        if value is _MISSING or value is None or isinstance(value, (dict, list)):
            continue
        where = f"{path}: {_dotted(keys)} = {value!r}"
        if isinstance(default, bool) and not isinstance(value, bool):
            raise LabsError(f"{where}: DeepSpeed reads this key as true/false (default {json.dumps(default)}) and "
                            f"would take any non-empty value as true; write true or false")
        if isinstance(default, (int, float)) and not isinstance(default, bool) \
                and isinstance(value, (bool, str)):
            raise LabsError(f"{where}: DeepSpeed expects a number here (default {default!r}); write a number")


def _unknown_nested(cfg: dict[str, Any], log: _Log, models: list[tuple[type, dict]], path: str) -> None:
    """Keys inside DeepSpeed's dict-style sections that it never looks up (it would ignore them)."""
    from deepspeed.runtime.config import get_pipeline_config
    skip = set(log.bulk) | {("optimizer", "params"), ("scheduler", "params")} | {(k,) for k in REFUSED}
    for _, data in models:  # pydantic sections refuse unknown keys themselves
        found = _find_section(cfg, data)
        if found is not None:
            skip.add(found)
        for v in data.values():
            if isinstance(v, _Tracked):
                skip.add(v._path)
    pipeline = cfg.get("pipeline")
    if isinstance(pipeline, dict):
        known = set(get_pipeline_config({}))
        for key in pipeline:
            if key not in known:
                raise LabsError(_unknown_message(path, ("pipeline", key), pipeline[key], known))
    opened = {p[:-1] for p in log.seen}  # dicts DeepSpeed looked into
    for keys, value in _walk(cfg):
        if len(keys) < 2 or any(keys[:i] in skip for i in range(1, len(keys))) or keys[0] == "pipeline":
            continue
        if isinstance(keys[-1], int) or any(isinstance(k, int) for k in keys):
            continue
        parent = keys[:-1]
        if parent not in opened:
            continue  # DeepSpeed never opened this dict (nothing to compare with)
        if keys not in log.seen:
            siblings = {p[-1] for p in log.seen if p[:-1] == parent}
            raise LabsError(_unknown_message(path, keys, value, siblings))


def _unknown_message(path: str, keys: tuple, value: Any, known: set | list) -> str:
    close = difflib.get_close_matches(str(keys[-1]), [str(k) for k in known], n=1)
    hint = f"did you mean {close[0]!r}?" if close else \
        f"remove it (DeepSpeed reads {', '.join(sorted(str(k) for k in known))} there)"
    return f"{path}: unknown key {_dotted(keys)} = {value!r} (DeepSpeed would ignore it silently); {hint}"


def _pydantic_message(e: Any, models: list[tuple[type, dict]], cfg: dict[str, Any], path: str) -> str:
    cls, data = next(((c, d) for c, d in reversed(models) if c.__name__ == e.title), (None, None))
    base = _find_section(cfg, data) if data is not None else None
    base = () if base is None else base
    errors = e.errors()
    err = errors[0]
    loc = tuple(str(x) for x in err["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if err["type"] == "extra_forbidden":
        return _unknown_message(path, base + loc, err.get("input"), _model_keys(cls, loc[:-1])) \
            .replace(" (DeepSpeed would ignore it silently)", f" (DeepSpeed's {e.title} refuses it)") + more
    owner = _model_at(cls, loc[:-1]) if loc else None
    field = _model_field(owner, loc[-1]) if owner is not None else None
    default = field.get_default() if field is not None and not field.is_required() else None
    default = getattr(default, "value", default)
    fix = (f"write a valid value, or remove the key for DeepSpeed's default ({default!r})"
           if default is not None else "write a valid value")
    if not loc:
        return f"{path}: {_dotted(base) or 'the config'}: {err['msg']} (DeepSpeed's {e.title}); {fix}{more}"
    return f"{path}: {_dotted(base + loc)} = {err.get('input')!r}: {err['msg']} (DeepSpeed's {e.title}); {fix}{more}"


def _deepspeed_message(e: BaseException, log: _Log, path: str, world: int) -> str:
    msg = str(e).strip() or type(e).__name__
    if "train_batch_size" in msg or "batch" in msg.lower():
        return (f"{path}: the batch triad: {msg} (DeepSpeed's check, data-parallel world {world}); make "
                f"train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x {world}, "
                f"or set train_batch_size to \"auto\"")
    if "bfloat16 and fp16" in msg:
        return f"{path}: fp16.enabled and bf16.enabled are both true: {msg}; enable one of them"
    where = f" (while reading {_dotted(log.last)})" if log.last else ""
    return f"{path}: DeepSpeed refuses the config{where}: {type(e).__name__}: {msg}; change the value it names"


# ---------------------------------------------------------------- precision

def cpu_has_bf16(cpuinfo: Path | None = None) -> bool | None:
    """True when /proc/cpuinfo lists avx512_bf16 or amx_bf16, False when it lists neither, None
    when it cannot be read (not Linux)."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return any(f in flags for f in BF16_FLAGS)


def machine_bf16(accelerator: str) -> bool:
    """Whether this machine computes bf16 fast: a CPU listing amx_bf16 or avx512_bf16 (docs/benchmarks.md:
    1.4-1.5x fp32's tokens/s on llama-small there), a CUDA GPU that supports bf16 (Ampere and later)."""
    if accelerator == "cpu":
        return cpu_has_bf16() is True
    try:
        import torch
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except Exception:  # noqa: BLE001 - no torch/CUDA to ask: fp32, which always works
        return False


def machine_bf16_reason(accelerator: str) -> str:
    if accelerator == "cpu":
        has = cpu_has_bf16()
        return (f"this CPU lists {'/'.join(BF16_FLAGS)}" if has else
                f"this CPU lists neither {' nor '.join(BF16_FLAGS)}: fp32" if has is False else
                f"{CPUINFO} unreadable: fp32")
    return "the GPU supports bf16" if machine_bf16(accelerator) else "no bf16 support found on the GPU: fp32"


def _precision(cfg: dict[str, Any], path: str, accelerator: str) -> None:
    bf16_key = "bf16" if "bf16" in cfg else "bfloat16"
    fp16 = _get(cfg, ("fp16", "enabled")) is True
    bf16 = _get(cfg, (bf16_key, "enabled")) is True
    autocast = cfg.get("torch_autocast") if isinstance(cfg.get("torch_autocast"), dict) else {}
    autocast_fp16 = autocast.get("enabled") is True and str(autocast.get("dtype", "")).lower() in (
        "fp16", "float16", "half", "torch.float16")
    if accelerator != "cpu":
        return
    has_bf16 = cpu_has_bf16()
    if fp16 or autocast_fp16:
        field = "fp16.enabled = True" if fp16 else f"torch_autocast.dtype = {autocast.get('dtype')!r}"
        off = "fp16.enabled" if fp16 else "torch_autocast.enabled"
        has = "this CPU has" if has_bf16 else "on a CPU with"
        fix = (f"use bf16 instead (\"bf16\": {{\"enabled\": true}}; {has} {'/'.join(BF16_FLAGS)}), or fp32 "
               f"(set {off} to false)" if has_bf16 is not False else
               f"use fp32: set {off} to false (this CPU has no bf16 support either: neither {' nor '.join(BF16_FLAGS)})")
        raise LabsError(f"{path}: {field} on CPU: DeepSpeed would train in float16, which CPUs have no fast "
                        f"kernels for (slower than fp32, with loss scaling to manage); {fix}")
    if bf16 and has_bf16 is False:
        raise LabsError(f"{path}: {bf16_key}.enabled = True, but this CPU lists neither {' nor '.join(BF16_FLAGS)} "
                        f"in {CPUINFO}: bfloat16 matmuls would be emulated, many times slower than fp32; set "
                        f"{bf16_key}.enabled to false (fp32), or run on a CPU with AVX512-BF16/AMX")


# ---------------------------------------------------------------- optimizer and scheduler

NO_OPTIMIZER_FIX = ('add "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", '
                    '"weight_decay": "auto", "torch_adam": true}} (the "auto" values come from the job)')


def _optimizer_class(cfg: dict[str, Any], path: str, accelerator: str) -> tuple[Any, dict[str, Any]]:
    """(the class DeepSpeed builds for the config's optimizer or None for Muon, the parameters it
    passes), as DeepSpeedEngine._configure_basic_optimizer / get_optimizer_configuration do."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    opt = cfg.get("optimizer")
    if not isinstance(opt, dict) or opt.get("type") is None:
        what = "no \"optimizer\" section" if opt is None else f"optimizer = {opt!r} has no \"type\""
        raise LabsError(f"{path}: {what}; labs' ranks give deepspeed.initialize no optimizer of their own, so "
                        f"DeepSpeed would build none and stop at initialize (ZeRO) or at the first backward; {NO_OPTIMIZER_FIX}")
    name = opt["type"]
    if not isinstance(name, str):
        raise LabsError(f"{path}: optimizer.type = {name!r}; write a name such as \"AdamW\"")
    params = opt.get("params") or {}
    if not isinstance(params, dict):
        raise LabsError(f"{path}: optimizer.params = {params!r}; it must be an object of the optimizer's arguments")
    params = dict(params)
    if "max_grad_norm" in params:
        raise LabsError(f"{path}: optimizer.params.max_grad_norm = {params['max_grad_norm']!r}: DeepSpeed refuses it "
                        f"as an optimizer parameter; remove it and set the top-level \"gradient_clipping\" instead")
    for key in ("lr", "eps", "weight_decay"):
        if key in params and (isinstance(params[key], (bool, str)) or not isinstance(params[key], (int, float))):
            raise LabsError(f"{path}: optimizer.params.{key} = {params[key]!r} is not a number; torch would fail on it "
                            f"at the first step; write a number")
    betas = params.get("betas")
    if betas is not None and not (isinstance(betas, list) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
        raise LabsError(f"{path}: optimizer.params.betas = {betas!r}; write two numbers, e.g. [0.9, 0.999]")
    lname = name.lower() if name.lower() in DEEPSPEED_OPTIMIZERS else name
    off = offload(cfg)[0]
    on_cpu = accelerator == "cpu"
    if lname in ("adam", "adamw", "muon"):
        adam_w_mode = params.pop("adam_w_mode", True)
        torch_adam = params.pop("torch_adam", False)
        params.pop("fp32_optimizer_states", None)
        if lname == "muon":
            return None, params
        if torch_adam:
            params.pop("foreach", None)
            return (torch.optim.AdamW if lname == "adamw" or adam_w_mode else torch.optim.Adam), params
        if off:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam, params
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam, params
    if lname == "adagrad":
        if off:
            from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad
            return DeepSpeedCPUAdagrad, params
        return torch.optim.Adagrad, params
    if lname == "lion":
        if off:
            from deepspeed.ops.lion import DeepSpeedCPULion
            return DeepSpeedCPULion, params
        if on_cpu:
            raise LabsError(f"{path}: optimizer.type = {name!r} without optimizer offload builds FusedLion, which "
                            f"DeepSpeed does not implement on CPU; offload the optimizer "
                            f"(zero_optimization.offload_optimizer.device = \"cpu\") or use \"AdamW\"")
        from deepspeed.ops.lion import FusedLion
        return FusedLion, params
    if lname == "lamb":
        if on_cpu:
            raise LabsError(f"{path}: optimizer.type = {name!r} builds FusedLamb, which DeepSpeed does not implement "
                            f"on CPU; use \"AdamW\" (with \"torch_adam\": true) or a torch.optim optimizer")
        from deepspeed.ops.lamb import FusedLamb
        return FusedLamb, params
    if lname in ("muadam", "muadamw", "musgd"):
        if importlib.util.find_spec("mup") is None:
            raise LabsError(f"{path}: optimizer.type = {name!r} needs the `mup` package, which is not installed; "
                            f"pip install mup, or use \"AdamW\"")
        import mup
        return getattr(mup, {"muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD"}[lname]), params
    if not hasattr(torch.optim, name) or not isinstance(getattr(torch.optim, name), type):
        choices = sorted(set(DEEPSPEED_OPTIMIZERS) | {n for n in dir(torch.optim) if n[0].isupper()
                                                      and isinstance(getattr(torch.optim, n), type)})
        close = [c for c in choices if c.lower() == name.lower()] or difflib.get_close_matches(name, choices, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(choices)}"
        raise LabsError(f"{path}: optimizer.type = {name!r} is neither a DeepSpeed optimizer nor one of torch.optim "
                        f"(DeepSpeed would fail with AttributeError); {hint}")
    return getattr(torch.optim, name), params


def _check_optimizer(cfg: dict[str, Any], path: str, accelerator: str) -> Any:
    """Mirror DeepSpeed's optimizer construction; returns a torch optimizer on a dummy parameter with
    the config's learning rate (for the scheduler check)."""
    import torch
    cls, params = _optimizer_class(cfg, path, accelerator)
    name = cfg["optimizer"]["type"]
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    if cls is not None:
        try:
            inspect.signature(cls).bind(dummy, **params)
        except TypeError:
            known = [p for p in inspect.signature(cls).parameters if p not in ("self", "params", "model_params")]
            bad = next(k for k in params if k not in known)
            raise LabsError(_unknown_message(path, ("optimizer", "params", bad), params[bad], known)
                            .replace("DeepSpeed would ignore it silently", f"{cls.__name__} does not take it")) from None
    # the values, by torch's own checks: the real class when it is torch's, else AdamW on the common ones
    real = cls is not None and cls.__module__.startswith("torch.optim")
    probe_cls = cls if real else torch.optim.AdamW
    probe = params if real else {k: v for k, v in params.items() if k in ("lr", "betas", "eps", "weight_decay")}
    try:
        opt = probe_cls(dummy, **probe)
    except (ValueError, TypeError, RuntimeError) as e:
        field = next((k for k in ("lr", "betas", "eps", "weight_decay", "momentum") if k in params and
                      (k in str(e) or {"lr": "learning rate", "betas": "beta", "eps": "epsilon"}.get(k, "@") in str(e))),
                     None)
        where = f"optimizer.params.{field} = {params[field]!r}" if field else f"optimizer.params = {params!r}"
        raise LabsError(f"{path}: {where}: {name} refuses it ({e}); write a valid number") from None
    # ZeRO runs only the optimizers DeepSpeed tested unless told otherwise (engine._do_optimizer_sanity_check)
    if zero_stage(cfg) > 0 and cls is not None and not cfg.get("zero_allow_untested_optimizer", False):
        from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS
        if not any(issubclass(cls, s) for s in ZERO_SUPPORTED_OPTIMIZERS):
            raise LabsError(f"{path}: optimizer.type = {name!r} with zero_optimization.stage = {zero_stage(cfg)}: "
                            f"DeepSpeed refuses an untested ZeRO optimizer ({cls.__name__}); add "
                            f"\"zero_allow_untested_optimizer\": true, or use \"AdamW\"")
    return opt


def _check_scheduler(cfg: dict[str, Any], path: str, optimizer: Any) -> None:
    """Build the scheduler as DeepSpeedEngine._scheduler_from_config does, on the probe optimizer."""
    import torch
    from deepspeed.runtime import lr_schedules
    sched = cfg.get("scheduler")
    if sched is None:
        return
    if not isinstance(sched, dict) or not isinstance(sched.get("type"), str):
        raise LabsError(f"{path}: scheduler = {sched!r}; it needs a \"type\" such as \"WarmupLR\" and \"params\"")
    name, params = sched["type"], sched.get("params") or {}
    if hasattr(lr_schedules, name):
        cls = getattr(lr_schedules, name)
    elif hasattr(torch.optim.lr_scheduler, name):
        cls = getattr(torch.optim.lr_scheduler, name)
    else:
        close = difflib.get_close_matches(name, lr_schedules.VALID_LR_SCHEDULES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(lr_schedules.VALID_LR_SCHEDULES)} " \
                                                            f"or a torch.optim.lr_scheduler class"
        raise LabsError(f"{path}: scheduler.type = {name!r}: DeepSpeed does not recognize this LR scheduler; {hint}")
    if not isinstance(params, dict):
        raise LabsError(f"{path}: scheduler.params = {params!r}; it must be an object of {name}'s arguments")
    known = [p for p in inspect.signature(cls).parameters if p not in ("self", "optimizer")]
    bad = next((k for k in params if k not in known), None) if "kwargs" not in known else None
    if bad is not None:
        raise LabsError(_unknown_message(path, ("scheduler", "params", bad), params[bad], known)
                        .replace("DeepSpeed would ignore it silently", f"{name} does not take it"))
    try:
        cls(optimizer, **params)
    except (ValueError, TypeError, AssertionError, KeyError, ZeroDivisionError) as e:
        field = next((k for k in params if k in str(e)), None)
        where = f"scheduler.params.{field} = {params[field]!r}" if field else f"scheduler.params = {params!r}"
        raise LabsError(f"{path}: {where}: {name} refuses it ({e}); write a valid value") from None


# ---------------------------------------------------------------- validate

MONITOR_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet": "comet_ml"}


def validate(cfg: dict[str, Any], path: str, *, world: int, accelerator: str) -> list[str]:
    """Refuse, as one LabsError naming file, dotted field, value and fix, everything that DeepSpeed
    would refuse at deepspeed.initialize and everything labs would not honour. `cfg` is the resolved
    config (after resolve_auto and resolve_batch); `world` is the data-parallel size DeepSpeed checks
    the batch triad against (layout.dp); `accelerator` is "cpu" or "cuda" (DS_ACCELERATOR).
    Comment keys (`_...`) are ignored. Returns DeepSpeed's own warnings about the config (deprecated
    keys, ...), for the plan to print. Imports DeepSpeed (about 2-3 s the first time)."""
    cfg = strip_comments(cfg)
    _refuse_auto(cfg, path)
    for keys, value in _walk(cfg):
        if keys[-1] == "enabled" and not isinstance(value, bool):
            raise LabsError(f"{path}: {_dotted(keys)} = {value!r} is not a JSON boolean (DeepSpeed would read any "
                            f"non-empty value as true, or refuse it); write true or false")
    with _deepspeed(accelerator) as records:
        from deepspeed.runtime import config as ds_config
        removed = getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {})
        removed_zero = getattr(ds_config, "_REMOVED_ZERO_CONFIG_KEYS", {})
        for key, message in removed.items():
            if key in cfg:
                raise LabsError(f"{path}: {key} = {_short(cfg[key])}: DeepSpeed {_ds_version()} refuses this legacy "
                                f"key: {message.strip()} Fix: remove it")
        for key, message in removed_zero.items():
            if isinstance(cfg.get("zero_optimization"), dict) and key in cfg["zero_optimization"]:
                raise LabsError(f"{path}: zero_optimization.{key} = {_short(cfg['zero_optimization'][key])}: "
                                f"DeepSpeed {_ds_version()} refuses it: {message.strip()} Fix: remove it")
        check_keys(cfg, path)
        _strict_defaults(cfg, {(k,): v for k, v in _minimal_parse()[1].items()}, path)  # before DeepSpeed trips
        for key, (reason, fix) in REFUSED.items():
            if key in cfg and not _harmless(cfg[key]):
                raise LabsError(f"{path}: {key} = {_short(cfg[key])} is accepted by DeepSpeed but not honoured "
                                f"here: {reason}; {fix}")
        _precision(cfg, path, accelerator)
        for key, package in MONITOR_PACKAGES.items():
            if _get(cfg, (key, "enabled")) is True and importlib.util.find_spec(package) is None:
                raise LabsError(f"{path}: {key}.enabled = True needs the `{package}` package at deepspeed.initialize, "
                                f"and it is not installed; pip install {package}, or set {key}.enabled to false")
        if cfg.get("datastates_ckpt", False) is not False and importlib.util.find_spec("datastates") is None:
            raise LabsError(f"{path}: datastates_ckpt = {_short(cfg['datastates_ckpt'])} turns on DataStates "
                            f"checkpointing, which needs the `datastates` package (not installed); remove the key")

        from pydantic import ValidationError
        try:
            _, log, models = _parse(cfg, world)
            warnings = [r.getMessage() for r in records]
        except ValidationError as e:
            raise LabsError(_pydantic_message(e, _last_models, cfg, path)) from None
        except (AssertionError, ValueError, TypeError, KeyError, AttributeError,
                ds_config.DeepSpeedConfigError) as e:
            raise LabsError(_deepspeed_message(e, _last_log, path, world)) from None
        for cls, data in models:
            _strict_types(cls, data, _find_section(cfg, data) or (), path)
        _strict_defaults(cfg, log.seen, path)
        _unknown_nested(cfg, log, models, path)
        optimizer = _check_optimizer(cfg, path, accelerator)
        _check_scheduler(cfg, path, optimizer)
    return warnings


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


@functools.lru_cache(maxsize=1)
def _ds_version() -> str:
    from importlib.metadata import version
    return version("deepspeed")


# ---------------------------------------------------------------- ops built on first use

OP_BUILD_SECONDS = {"cpu_adam": 155, "fused_adam": 112, "cpu_adagrad": 155, "cpu_lion": 155, "async_io": 60,
                    "fused_lion": 120, "fused_lamb": 120}
"""One-time JIT build, seconds on 2 cores: cpu_adam and fused_adam measured (shared/DEEPSPEED-CPU.md);
the others are estimates from their size (cpu_adagrad and cpu_lion share cpu_adam's sources)."""


def ops_needed(cfg: dict[str, Any], ext_dir: str | Path | None = None) -> list[tuple[str, int, bool]]:
    """(op, expected one-time build seconds, already built in $TORCH_EXTENSIONS_DIR) for each DeepSpeed
    op this config makes the ranks JIT-build: the optimizer's (cpu_adam for an offloaded Adam, fused_adam
    for Adam/AdamW without "torch_adam": true, ...) and async_io for NVMe offload. The CPU comm op
    every CPU run needs is not listed (launcher.rank_env.comm_op_built)."""
    ops: list[str] = []
    opt = cfg.get("optimizer")
    if isinstance(opt, dict) and isinstance(opt.get("type"), str):
        lname = opt["type"].lower()
        params = opt.get("params") if isinstance(opt.get("params"), dict) else {}
        off = offload(cfg)[0]
        if lname in ("adam", "adamw", "muon") and not params.get("torch_adam", False):
            ops.append("cpu_adam" if off else "fused_adam")
        elif lname == "adagrad" and off:
            ops.append("cpu_adagrad")
        elif lname == "lion":
            ops.append("cpu_lion" if off else "fused_lion")
        elif lname == "lamb":
            ops.append("fused_lamb")
    zero = cfg.get("zero_optimization") if isinstance(cfg.get("zero_optimization"), dict) else {}
    if any((zero.get(k) or {}).get("device") == "nvme" for k in ("offload_optimizer", "offload_param")):
        ops.append("async_io")
    from launcher.rank_env import extensions_dir
    root = Path(ext_dir or extensions_dir())
    return [(op, OP_BUILD_SECONDS[op], (root / op / f"{op}.so").is_file()) for op in ops]
