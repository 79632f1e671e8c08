"""Reading the user's files safely: UTF-8 text of a bounded size, YAML without alias bombs, JSON
of bounded size and depth. Every refusal is a `LabsError` that names the file and says the fix.

Nothing a user can write here should become a traceback or a hang: a binary or UTF-16 file, a
YAML alias bomb (`a: &a [x, x]`, `b: &b [*a, *a]`, ... doubles each line), a recursive alias, JSON
nested thousands of levels deep or numbers with thousands of digits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from launcher.common.errors import LabsError

MiB = 1024 * 1024


CONFIG_MAX_BYTES = 10 * MiB
"""Largest job, DeepSpeed config or hostfile read (real ones are a few KiB)."""


YAML_MAX_BYTES = MiB // 4
"""Largest YAML job (real ones have about 1 KiB): PyYAML's pure-Python parser needs seconds per MiB."""


MAX_DEPTH = 64
"""Deepest nesting of lists and mappings in a YAML or JSON file (real ones nest 4 levels)."""


YAML_MAX_NODES = 10_000
"""Most values a YAML document may hold once its aliases are expanded (a job has about 50)."""


_UTF16_32_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32",
                  b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


_UTF8_BOM = b"\xef\xbb\xbf"


def is_file(path: str | Path) -> bool:
    """Path.is_file() that answers False instead of raising (a name too long, a NUL byte)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def read_bytes(path: str | Path, what: str, max_bytes: int = CONFIG_MAX_BYTES) -> bytes:
    """The file's bytes; a missing file, a folder, a device or FIFO, or one over max_bytes is refused."""
    p = Path(path)
    if not is_file(p):  # also keeps FIFOs and devices (which could block or never end) out
        raise LabsError(f"{what} {str(path)!r} does not exist or is not a regular file")
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise LabsError(f"{path}: {size:,} bytes; a {what} may have at most {max_bytes:,} bytes "
                            f"(is it the right file?)")
        with p.open("rb") as f:
            return f.read(max_bytes + 1)[:max_bytes]
    except OSError as e:
        raise LabsError(f"{what} {str(path)!r} cannot be read ({e.strerror or e}); check the path and "
                        f"its permissions") from None


def decode_text(data: bytes, source: str, *, allow_bom: bool = True) -> str:
    """UTF-8 text from bytes; UTF-16/32, binary and other encodings are refused with the fix."""
    for bom, name in _UTF16_32_BOMS.items():
        if data.startswith(bom):
            raise LabsError(f"{source}: the file is {name} text; save it as UTF-8")
    if data.startswith(_UTF8_BOM):
        if not allow_bom:
            raise LabsError(f"{source}: the file starts with a byte-order mark (EF BB BF) that DeepSpeed's "
                            f"runner would read as part of the first line; save it as UTF-8 without BOM")
        data = data[len(_UTF8_BOM):]
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise LabsError(f"{source}: line {line} holds a NUL byte: a binary file or UTF-16 text without "
                        f"byte-order mark, not text; save it as UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LabsError(f"{source}: line {line}: byte 0x{data[e.start]:02x} at offset {e.start} is not "
                        f"UTF-8 (another encoding, e.g. Latin-1 or Windows-1252?); save the file as UTF-8") from None


def read_text(path: str | Path, what: str, max_bytes: int = CONFIG_MAX_BYTES, *, allow_bom: bool = True) -> str:
    """A user's text file as str: at most max_bytes, UTF-8 (a leading BOM dropped unless allow_bom
    is False, then refused); `what` names the kind of file in messages ("job file", "hostfile")."""
    return decode_text(read_bytes(path, what, max_bytes), str(path), allow_bom=allow_bom)


class _YamlLimit(yaml.YAMLError):
    """A document past MAX_DEPTH or YAML_MAX_NODES, or with a recursive alias (raised while composing)."""

    def __init__(self, message: str, mark: yaml.Mark | None):
        super().__init__(message)
        self.message, self.mark = message, mark


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts, while composing and before anything is built, how many values the
    document holds with every alias expanded (an alias costs the size of what it names, so `[*a, *a]`
    doubles), and how deep it nests. Past a limit it stops at once: an alias bomb or a huge file
    costs a few thousand values of work, not the expansion."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._total = 0  # values so far, aliases expanded
        self._sizes: dict[int, int] = {}  # id(node) -> values under it, aliases expanded

    def compose_node(self, parent, index):  # type: ignore[override]
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise _YamlLimit("an alias refers to the anchor it is inside (a recursive structure)", mark)
            self._add(self._sizes[id(node)], mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _YamlLimit(f"lists and mappings nest more than {MAX_DEPTH} levels deep", mark)
        self._add(1, mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        self._sizes[id(node)] = 1 + sum(self._sizes[id(c)] for c in children)
        return node

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        """A key twice in one mapping is refused (YAML's loaders keep the second silently)."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _YamlLimit(f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); the second "
                                 f"would silently win: keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)

    def _add(self, values: int, mark: yaml.Mark) -> None:
        self._total += values
        if self._total > YAML_MAX_NODES:
            raise _YamlLimit(f"the document holds more than {YAML_MAX_NODES:,} values with its aliases "
                             f"expanded (an alias bomb?); write a smaller job or use fewer aliases", mark)


def load_yaml(text: str, source: str) -> Any:
    """One YAML document, safely: no Python objects, no alias bombs, no deep nesting."""
    try:
        loader = _BoundedLoader(text)
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise LabsError(f"{source}: line {line}: character {e.character:#06x} is not allowed in YAML (a control "
                        f"character); remove it or write it as an escape in double quotes") from None
    loader.name = source
    try:
        return loader.get_single_data()
    except _YamlLimit as e:
        raise LabsError(f"{source}:{_where(e.mark)} refused: {e.message}") from None
    except yaml.MarkedYAMLError as e:
        what = "; ".join(str(x) for x in (e.context, e.problem) if x)
        raise LabsError(f"{source}:{_where(e.problem_mark or e.context_mark)} not valid YAML ({what})") from None
    except yaml.YAMLError as e:
        raise LabsError(f"{source}: not valid YAML ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    except RecursionError:  # belt and braces: MAX_DEPTH keeps the composer far from the limit
        raise LabsError(f"{source}: refused: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise LabsError(f"{source}: a value cannot be read ({str(e)[:120]})") from None
    finally:
        loader.dispose()


def _where(mark: yaml.Mark | None) -> str:
    return f" line {mark.line + 1} column {mark.column + 1}:" if mark else ""


def load_yaml_mapping(path: str | Path, what: str, *, text: str | None = None) -> dict[str, Any]:
    """A YAML file (or `text`, with `path` naming it in messages) whose top level is a mapping;
    an empty document is {}. Reads the file with `read_text` (UTF-8, at most YAML_MAX_BYTES)."""
    source = str(path)
    if text is None:
        text = read_text(path, what, YAML_MAX_BYTES)
    data = load_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LabsError(f"{source}: the top level of a {what} must be a mapping of keys (like "
                        f"'task: fine_tune'), got a {_kind(data)}")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; write a number or a string")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object (DeepSpeed refuses that); keep one")
        out[key] = value
    return out


def json_depth(value: Any) -> int:
    """How deep lists and objects nest (a scalar is 0); iterative, so any depth is safe to measure."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in children)
    return deepest


def load_json(path: str | Path, what: str, max_bytes: int = CONFIG_MAX_BYTES) -> Any:
    """A JSON file (UTF-8, at most max_bytes, nesting at most MAX_DEPTH, no NaN/Infinity, no
    duplicate keys). Errors name the file and the line and column."""
    text = read_text(path, what, max_bytes)
    try:
        data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise LabsError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise LabsError(f"{path}: refused: lists and objects nest more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # our hooks, and numbers of more than 4,300 digits
        raise LabsError(f"{path}: invalid JSON: {str(e)[:200]}") from None
    if json_depth(data) > MAX_DEPTH:
        raise LabsError(f"{path}: refused: lists and objects nest more than {MAX_DEPTH} levels deep")
    return data


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__)


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read 4 MiB at a time (checkpoint conversions, converted model folders)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
