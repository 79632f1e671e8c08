"""The rules a job's (and a task's options') values are checked against, and the dataclass builder that
checks them: an unknown key, a value of the wrong type or out of range is a `LabsError` naming the
file, the field, the value and what it must be. A field's range lives next to it (`checked(rule,
default)`); a rule that spans fields lives in the section's `__post_init__` (raising `FieldError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from launcher.common.errors import LabsError


@dataclass(frozen=True)
class Rule:
    """What a field's value must be: `ok(value)` for a value of the right type (None is never
    checked), `must` the end of the message: "<file>: train.log_every = 0; it must be >= 1 (...)"."""
    ok: Callable[[Any], bool]
    must: str
    each: bool = False
    """Check every entry of a list instead of the list."""


class FieldError(ValueError):
    """A rule over several fields, raised by a section's __post_init__; `build_section` adds file and prefix."""

    def __init__(self, name: str, value: Any, must: str):
        super().__init__(f"{name} = {show(value)}; {must}")
        self.name, self.value, self.must = name, value, must


def checked(rule: Rule, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a rule (`build_section` checks it for every value a job gives)."""
    return field(default=default, default_factory=factory, metadata={"rule": rule})


def at_least(lo: int, why: str) -> Rule:
    return Rule(lambda v: v >= lo, f"it must be >= {lo} ({why})")


def between(lo: float, hi: float, why: str) -> Rule:
    return Rule(lambda v: lo <= v <= hi, f"it must be between {lo} and {hi} ({why})")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"choose one of {', '.join(choices)}")


def non_empty(why: str, each: bool = False) -> Rule:
    return Rule(lambda v: bool(v.strip()), f"it must not be empty ({why})", each)


def _path_ok(v: str) -> bool:
    parts = v.encode("utf-8").split(b"/")
    return bool(v.strip()) and len(v.encode("utf-8")) < 4096 and all(len(p) <= 255 for p in parts)


PATH_RULE = Rule(_path_ok, "it must be a path: not empty, at most 4,095 bytes, each name at most 255 bytes")


PATHS_RULE = Rule(_path_ok, PATH_RULE.must, each=True)


NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


NAME_RULE = Rule(lambda v: bool(NAME.fullmatch(v)),
                 "the name is a folder (train.output_dir/NAME/...): use up to 128 letters, digits, '.', '_' "
                 "or '-', starting with a letter, digit or '_' (no '/', no '..'), e.g. my_run")


SLURM_TIME = re.compile(r"(\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|infinite|unlimited)", re.IGNORECASE)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


MAX_TEXT = 4096


def _text_problem(value: str) -> str | None:
    """Why a string from a job cannot be used as text (in a path, a message, a command line), or None."""
    if len(value) > MAX_TEXT:
        return f"it is {len(value):,} characters long; at most {MAX_TEXT:,}"
    bad = _CONTROL.search(value)
    if bad:
        return f"it holds the control character {bad[0]!r} (or half a surrogate pair); remove it"
    return None


class _Short(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxstring, self.maxother, self.maxlong = 80, 80, 40

    def repr_int(self, x: int, level: int) -> str:  # repr() of a 5,000-digit int raises ValueError
        return repr(x) if x.bit_length() < 128 else f"<a {x.bit_length()}-bit number>"


def show(value: Any) -> str:
    """A value for a message: short, and safe for any value YAML or JSON can give."""
    return _Short().repr(value)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (entry,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, entry) for v in value)
    if origin is dict:
        key, _ = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(_type_ok(k, key) for k in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _type_error(value: Any, tp: Any, full: str) -> str | None:
    """None when value has type tp, else the message's end naming the entry that is wrong."""
    if _type_ok(value, tp):
        return None
    origin = typing.get_origin(tp)
    if origin is list and isinstance(value, list):
        (entry,) = typing.get_args(tp)
        i = next(i for i, v in enumerate(value) if not _type_ok(v, entry))
        return f"{full}[{i}] = {show(value[i])} has the wrong type; expected {_tname(entry)}"
    if origin is dict and isinstance(value, dict):
        key = next(k for k in value if not isinstance(k, str))
        return f"{full} has the key {show(key)}; keys must be strings"
    return f"{full} = {show(value)} has the wrong type; expected {_tname(tp)}"


def _strings(value: Any) -> list[tuple[str, str]]:
    """(suffix, text) for the strings of a value: itself, a list's entries, a mapping's keys."""
    if isinstance(value, str):
        return [("", value)]
    if isinstance(value, list):
        return [(f"[{i}]", v) for i, v in enumerate(value) if isinstance(v, str)]
    if isinstance(value, dict):
        return [(f" key {show(k)}", k) for k in value if isinstance(k, str)]
    return []


def _check_value(value: Any, tp: Any, f: dataclasses.Field, path: str, full: str) -> None:
    """Type, then text (no control characters, bounded length), then the field's rule."""
    wrong = _type_error(value, tp, full)
    if wrong:
        raise LabsError(f"{path}: {wrong}")
    for suffix, text in _strings(value):
        problem = _text_problem(text)
        if problem:
            raise LabsError(f"{path}: {full}{suffix} = {show(text)}; {problem}")
    rule: Rule | None = f.metadata.get("rule")
    if rule is None or value is None:
        return
    if not rule.each:
        if not rule.ok(value):
            raise LabsError(f"{path}: {full} = {show(value)}; {rule.must}")
        return
    for i, v in enumerate(value):
        if not rule.ok(v):
            raise LabsError(f"{path}: {full}[{i}] = {show(v)}; {rule.must}")


def build_section(cls: type, data: Any, path: str, prefix: str) -> Any:
    """An instance of the dataclass cls from a mapping, every key, type and rule checked; `prefix`
    names the section in messages ("train.")."""
    if data is None and prefix:
        data = {}  # `train:` with every line commented out (a null `model:` / `data:` is refused by the job)
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the top level"
        raise LabsError(f"{path}: {where} must be a mapping (key: value lines), got {show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key if isinstance(key, str) else show(key)}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1) if isinstance(key, str) else []
            hint = f"did you mean {prefix}{close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
            raise LabsError(f"{path}: unknown key {full!r}; {hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_section(tp, value, path, f"{full}.")
            continue
        _check_value(value, tp, fields[key], path, full)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise LabsError(f"{path}: {prefix}{e}") from None
