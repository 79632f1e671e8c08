"""DeepSpeed hostfile: one `host slots=N` per line, read exactly as DeepSpeed's runner reads it.

DeepSpeed (`deepspeed.launcher.runner._parse_hostfile`) strips each line, skips blank lines and
lines starting with '#', and matches DEEPSPEED_LINE at the start of every other line (what follows,
such as `max_slots=4` or `# comment`, is ignored); anything else, a host listed twice or no host at
all stops it. We mirror that rule (tests compare the two on generated hostfiles) and
refuse in addition, with the fix, what would fail later: slots outside 1..MAX_SLOTS, host names with
characters no host name has, a byte-order mark, text that is not UTF-8.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from launcher.common.errors import LabsError
from launcher.common.files import MiB, is_file, read_text

DEEPSPEED_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")
"""deepspeed/launcher/runner.py's pattern, used with re.search on the stripped line."""


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
MAX_HOST_NAME = 253


def host_problem(host: str) -> str | None:
    """Why `host` is neither an IP address nor a host name (None when it is one): labels of letters, digits,
    '-' and '_' (each 1-63 characters, not starting or ending with '-'), at most 253 characters in all. A
    leading '-' would reach ssh and pdsh as an option."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if host.startswith("-"):
        return "starts with '-' (ssh and pdsh would read it as an option)"
    if len(host) > MAX_HOST_NAME:
        return f"is {len(host)} characters long; a host name has at most {MAX_HOST_NAME}"
    if not all(_LABEL.fullmatch(label) for label in host.removesuffix(".").split(".")):
        return ("is not a host name; use letters, digits, '-' and '_' in dot-separated labels of 1-63 "
                "characters (not starting or ending with '-'), or an IP address")
    return None


MAX_SLOTS = 1024


_NEAR_MISS = re.compile(r"^(\S+)\s+slots\s*=\s*(\S+)")


@dataclass(frozen=True)
class Hostfile:
    path: str
    hosts: dict[str, int]  # host -> slots, in file order

    @property
    def world_size(self) -> int:
        return sum(self.hosts.values())


def _lines(text: str) -> list[str]:
    """Lines as Python's text-mode readlines() gives them to DeepSpeed (universal newlines)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _bad_line(path: str, lineno: int, line: str) -> LabsError:
    near = _NEAR_MISS.match(line[:200])
    if near and re.fullmatch(r"-\d+", near[2]):
        return LabsError(f"{path}:{lineno}: host {_short(near[1])} has slots={near[2]}; slots must be >= 1")
    if near and re.fullmatch(r"\d+", near[2]):
        return LabsError(f"{path}:{lineno}: {_short(line)}: DeepSpeed's runner reads only 'HOST slots=N' with no "
                         f"spaces around '='; write '{near[1]} slots={near[2]}'")
    return LabsError(f"{path}:{lineno}: {_short(line)} is not a hostfile line; expected 'HOST slots=N' "
                     f"(for example 'localhost slots=2')")


def _slots(path: str, lineno: int, host: str, digits: str) -> int:
    if len(digits) > 6 or not 1 <= int(digits) <= MAX_SLOTS:
        shown = digits if len(digits) <= 20 else digits[:20] + "..."
        raise LabsError(f"{path}:{lineno}: host {_short(host)} has slots={shown}; slots must be >= 1 and at most "
                        f"{MAX_SLOTS} (the ranks this host runs)")
    return int(digits)


_REST = re.compile(r"(\s+max_slots=\d+)?\s*(#.*)?")


def _check_rest(path: str, lineno: int, host: str, slots: str, rest: str) -> None:
    """What follows `slots=N`: DeepSpeed's runner ignores it silently, so only MPI's `max_slots=N` and a
    comment may stand there; `slots=1.5` (read as 1) or `gpus=1` (read as nothing) are refused."""
    if _REST.fullmatch(rest):
        return
    if rest[:1] not in ("", " ", "\t"):
        raise LabsError(f"{path}:{lineno}: host {_short(host)} has slots={slots}{_short(rest.split()[0])[1:-1]}; "
                        f"slots must be a whole number of ranks (DeepSpeed would read {slots})")
    raise LabsError(f"{path}:{lineno}: {_short(rest.strip())} after 'slots={slots}' is ignored by DeepSpeed's runner "
                    f"(only slots=N counts); remove it, or put a note after '#'")


def parse_hostfile(text: str, path: str = "<hostfile>") -> Hostfile:
    hosts: dict[str, int] = {}
    for lineno, raw in enumerate(_lines(text), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = DEEPSPEED_LINE.search(line)
        if not m:
            raise _bad_line(path, lineno, line)
        host = m[1]
        if why := host_problem(host):
            hint = " (a comment goes after the slots: 'HOST slots=N  # note')" if "not a host name" in why else ""
            raise LabsError(f"{path}:{lineno}: host {_short(host)} {why}{hint}")
        _check_rest(path, lineno, host, m[2], line[m.end():])
        slots = _slots(path, lineno, host, m[2])
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
    if not is_file(p):
        raise LabsError(
            f"hostfile {str(path)!r} does not exist; pass --hostfile hostfiles/localhost "
            f"or write one with lines 'HOST slots=N'"
        )
    return parse_hostfile(read_text(p, "hostfile", MiB, allow_bom=False), str(path))


LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def is_local(host: str) -> bool:
    """True for names of this machine (localhost, its hostname); a name may still resolve here
    through /etc/hosts, which is not looked at: such a hostfile needs `--backend ssh` or `local`."""
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
