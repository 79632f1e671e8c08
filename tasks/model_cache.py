"""Folders converted once per machine and cached: a model or tokenizer made from a pip package's files.

    $LABS_CACHE_DIR (default ~/.cache/llm-labs)/models/<name>/   a converted model folder
                                               /tokenizers/<kind>/ a converted tokenizer

A cached folder is complete when its `checksums.sha256` (written last, `sha256sum -c` format) matches
every file in it; anything else (no checksum file: a conversion that stopped half-way, a file that
differs, is missing or was added) is converted again. Ranks that start together take turns on a file
lock beside the folder (`.<name>.lock`): the first converts into a temporary folder and renames it into
place, the others wait and then find it complete. Torch-free: `labs plan` reads `verify` results.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from launcher.common.files import sha256_file

CHECKSUMS = "checksums.sha256"
CONVERSION = "conversion.json"
"""What the folder was converted from and how long it took (covered by the checksums)."""
_VERIFIED: set[tuple] = set()
"""Folders this process found complete, keyed with every file's size and mtime: hashed once per process."""


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(folder: Path) -> None:
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in _files(folder)]
    tmp = folder / f".{CHECKSUMS}.tmp"
    tmp.write_text("".join(lines))
    tmp.rename(folder / CHECKSUMS)


def verify(folder: Path, expect: dict[str, Any] | None = None, required: tuple[str, ...] = ()) -> str | None:
    """None when the folder is complete (every file matches checksums.sha256, the `required` files are
    there and conversion.json has the `expect` items), else why not, in words."""
    sums_file = folder / CHECKSUMS
    if not folder.is_dir():
        return "not converted yet"
    if not sums_file.is_file():
        return f"no {CHECKSUMS} (a conversion that did not finish)"
    if missing := [n for n in required if not (folder / n).is_file()]:
        return f"no {', '.join(missing)} (a conversion that wrote less than a model folder holds)"
    listed: dict[str, str] = {}
    for line in sums_file.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = _files(folder)
    if sorted(listed) != present:
        return f"files differ from {CHECKSUMS}: {sorted(set(listed) ^ set(present))[:5]}"
    stats = [(folder / n).stat() for n in [CHECKSUMS, *present]]
    key = (str(folder.resolve()), tuple(expect.items()) if expect else (),
           *((n, s.st_size, s.st_mtime_ns, s.st_ino) for n, s in zip([CHECKSUMS, *present], stats, strict=True)))
    if key in _VERIFIED:
        return None
    for name, digest in listed.items():
        if sha256_file(folder / name) != digest:
            return f"{name} does not match its sha256 in {CHECKSUMS} (corrupted)"
    if expect:
        try:
            info = json.loads((folder / CONVERSION).read_text())
        except (OSError, ValueError):
            return f"no readable {CONVERSION}"
        changed = [f"{k} {info.get(k)!r} -> {v!r}" for k, v in expect.items() if info.get(k) != v]
        if changed:
            return f"its source changed since it was converted ({', '.join(changed)})"
    _VERIFIED.add(key)
    return None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if needed), released when the block ends or the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_folder(target: Path, build: Callable[[Path], dict[str, Any]], what: str,
                  expect: dict[str, Any] | None = None, log: Callable[[str], None] | None = None,
                  required: tuple[str, ...] = ()) -> Path:
    """`target`, converted by `build(tmp_folder) -> info` if it is not complete (see the module's docstring).
    `info` and `expect` go to conversion.json with the conversion's seconds, which is printed; a build
    that leaves out a `required` file fails instead of being cached."""
    if verify(target, expect, required) is None:
        return target
    say = log or (lambda msg: print(f"[labs] {msg}", file=sys.stderr, flush=True))
    with file_lock(target.parent / f".{target.name}.lock"):
        reason = verify(target, expect, required)
        if reason is None:  # another process converted it while this one waited
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a process that died converting
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            say(f"{target}: {reason}; converting {what} again")
            trash = target.parent / f".{target.name}.tmp-old-{os.getpid()}"
            target.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            say(f"converting {what} into {target} (once per machine)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            t0 = time.perf_counter()
            info = dict(build(tmp)) | dict(expect or {})
            if missing := [n for n in required if not (tmp / n).is_file()]:
                raise RuntimeError(f"converting {what} wrote no {', '.join(missing)} into {tmp}")
            info["conversion_s"] = round(time.perf_counter() - t0, 1)
            (tmp / CONVERSION).write_text(json.dumps(info, indent=2) + "\n")
            write_checksums(tmp)
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache is shared by the machine's users
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"converted {what} into {target} in {info['conversion_s']} s")
    return target
