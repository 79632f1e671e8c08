"""`validate`: refuse, as one LabsError naming file, dotted field, value and fix, everything DeepSpeed would
refuse at `deepspeed.initialize` (its own parser does the DeepSpeed part: config/ds/parser.py) and every
section labs would not honour (`REFUSED`, each with the reason read in deepspeed/runtime/engine.py).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
from importlib.metadata import version
from typing import Any

from pydantic import ValidationError

from launcher.common.errors import LabsError
from launcher.config.ds.auto import _refuse_auto
from launcher.config.ds.load import REFUSED, _dotted, _harmless, _walk, get_path, strip_comments
from launcher.config.ds.optim import _check_optimizer, _check_scheduler, _precision
from launcher.config.ds.parser import (
    _deepspeed,
    _deepspeed_message,
    _find_section,
    _minimal_parse,
    _parse,
    _pydantic_message,
    _strict_defaults,
    _strict_types,
    _unknown_nested,
    accepted_keys,
    last_parse,
)

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
    _check_scalars(cfg, path)
    with _deepspeed(accelerator) as records:
        # keeps torch and DeepSpeed out of the labs process
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
            if get_path(cfg, (key, "enabled")) is True and importlib.util.find_spec(package) is None:
                raise LabsError(f"{path}: {key}.enabled = True needs the `{package}` package at deepspeed.initialize, "
                                f"and it is not installed; pip install {package}, or set {key}.enabled to false")
        if cfg.get("datastates_ckpt", False) is not False and importlib.util.find_spec("datastates") is None:
            raise LabsError(f"{path}: datastates_ckpt = {_short(cfg['datastates_ckpt'])} turns on DataStates "
                            f"checkpointing, which needs the `datastates` package (not installed); remove the key")

        try:
            _, log, models = _parse(cfg, world)
            warnings = [r.getMessage() for r in records]
        except ValidationError as e:
            raise LabsError(_pydantic_message(e, last_parse()[1], cfg, path)) from None
        except (AssertionError, ValueError, TypeError, KeyError, AttributeError,
                ds_config.DeepSpeedConfigError) as e:
            raise LabsError(_deepspeed_message(e, last_parse()[0], path, world)) from None
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
    return version("deepspeed")


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


SCALARS: dict[str, tuple[type | tuple[type, ...], float, str]] = {
    "gradient_clipping": ((int, float), 0, "a number >= 0, the global gradient norm to clip to (0: no clipping)"),
    "steps_per_print": ((int, float), 1, "a number >= 1, the optimizer steps between DeepSpeed's progress lines"),
    "gradient_predivide_factor": ((int, float), 1e-30, "a number > 0"),
}
"""Top-level values DeepSpeed reads without checking them (`get_scalar_param`): `steps_per_print: 0` would
divide by zero at the first step, `gradient_clipping: -1` or `[1.0]` would clip nothing or fail in the backward."""


def _check_scalars(cfg: dict[str, Any], path: str) -> None:
    for key, (kind, low, must) in SCALARS.items():
        if key not in cfg or cfg[key] is None:
            continue
        v = cfg[key]
        ok = isinstance(v, kind) and (kind is bool or not isinstance(v, bool)) and (kind is bool or v >= low)
        if not ok:
            raise LabsError(f"{path}: {key} = {_short(v)}; it must be {must}")
