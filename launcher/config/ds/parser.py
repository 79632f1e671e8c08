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
import json
import logging
import os
import types
import typing
from collections.abc import KeysView
from typing import Any

from pydantic import BaseModel

from launcher.common.errors import LabsError
from launcher.common.proc import accelerator
from launcher.config.ds.load import REFUSED, _dotted, _walk, get_path

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
        # keeps torch and DeepSpeed out of the labs process
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



def last_parse() -> tuple[_Log, list[tuple[type, dict]]]:
    """What the last `_parse` looked up and the pydantic sub-configs it built, also when DeepSpeed raised
    part-way (for the error message)."""
    return _last_log, _last_models

def _parse(cfg: dict[str, Any], world: int) -> tuple[Any, _Log, list[tuple[type, dict]]]:
    """DeepSpeedConfig built on a copy of cfg for a data-parallel world of `world`, with no process
    group: a subclass whose world_size ignores the 1 DeepSpeed falls back to without one. Returns the
    config object, what it looked up, and every pydantic sub-config built (class, data); the last
    two stay in _last_log / _last_models when DeepSpeed raises part-way."""
    global _last_models, _last_log
    # keeps torch and DeepSpeed out of the labs process
    from deepspeed.runtime.config import DeepSpeedConfig

    # keeps torch and DeepSpeed out of the labs process
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
        value = get_path(cfg, keys, _MISSING)
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
    # keeps torch and DeepSpeed out of the labs process
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
