"""DeepSpeed hostfile: one `host slots=N` per line, '#' comments and blank lines ignored."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import LabsError

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:\-]+)\s+slots\s*=\s*(?P<slots>-?\d+)\s*$")


@dataclass(frozen=True)
class Hostfile:
    path: str
    hosts: dict[str, int]  # host -> slots, in file order

    @property
    def world_size(self) -> int:
        return sum(self.hosts.values())


def parse_hostfile(text: str, path: str = "<hostfile>") -> Hostfile:
    hosts: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise LabsError(
                f"{path}:{lineno}: {raw.strip()!r} is not a hostfile line; expected 'HOST slots=N' "
                f"(for example 'localhost slots=2')"
            )
        host, slots = m["host"], int(m["slots"])
        if slots < 1:
            raise LabsError(f"{path}:{lineno}: host {host!r} has slots={slots}; slots must be >= 1")
        if host in hosts:
            raise LabsError(
                f"{path}:{lineno}: host {host!r} is listed twice; list each host once with its "
                f"total slots (slots={hosts[host] + slots})"
            )
        hosts[host] = slots
    if not hosts:
        raise LabsError(f"{path}: no hosts; add at least one line 'HOST slots=N'")
    return Hostfile(path, hosts)


def load_hostfile(path: str | Path) -> Hostfile:
    p = Path(path)
    if not p.is_file():
        raise LabsError(
            f"hostfile {str(path)!r} does not exist; pass --hostfile hostfiles/localhost "
            f"or write one with lines 'HOST slots=N'"
        )
    return parse_hostfile(p.read_text(), str(path))
