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


LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def is_local(host: str) -> bool:
    """True for names of this machine (localhost, its hostname); a name may still resolve here
    through /etc/hosts, which is not looked at: such a hostfile needs `--backend ssh` or `local`."""
    import socket
    return host in LOCAL_NAMES or host in (socket.gethostname(), socket.getfqdn())


def _parse_filter(text: str, hf: Hostfile, flag: str) -> dict[str, list[int] | None]:
    """DeepSpeed's --include/--exclude syntax: 'node1@node2:0,2' -> {node1: None, node2: [0, 2]}."""
    out: dict[str, list[int] | None] = {}
    for entry in text.split("@"):
        host, _, slots = entry.strip().partition(":")
        if host not in hf.hosts:
            raise LabsError(f"{flag} {text!r}: host {host!r} is not in {hf.path} "
                            f"(hosts: {', '.join(hf.hosts)}); write hosts joined by '@', e.g. node1@node2:0,1")
        if not slots:
            out[host] = None
            continue
        try:
            picked = sorted({int(x) for x in slots.split(",")})
        except ValueError:
            raise LabsError(f"{flag} {text!r}: slots of {host!r} must be numbers, e.g. {host}:0,1") from None
        if picked[0] < 0 or picked[-1] >= hf.hosts[host]:
            raise LabsError(f"{flag} {text!r}: {host} has slots 0..{hf.hosts[host] - 1} in {hf.path}")
        out[host] = picked
    return out


def select(hf: Hostfile, include: str = "", exclude: str = "") -> Hostfile:
    """The hosts and slot counts that run, after DeepSpeed's --include/--exclude filters."""
    if include and exclude:
        raise LabsError("--include and --exclude (cluster.include / cluster.exclude) cannot be used "
                        "together; DeepSpeed accepts one of them")
    if not (include or exclude):
        return hf
    if include:
        picked = _parse_filter(include, hf, "--include")
        hosts = {h: hf.hosts[h] if s is None else len(s) for h, s in picked.items()}
        hosts = {h: hosts[h] for h in hf.hosts if h in hosts}  # keep the file's order
    else:
        dropped = _parse_filter(exclude, hf, "--exclude")
        hosts = {h: n if h not in dropped else (0 if dropped[h] is None else n - len(dropped[h]))
                 for h, n in hf.hosts.items()}
        hosts = {h: n for h, n in hosts.items() if n > 0}
    if not hosts:
        raise LabsError(f"--exclude {exclude!r} leaves no host of {hf.path} to run on")
    return Hostfile(hf.path, hosts)
