"""Small text helpers the plan, the backends, `labs launch` and the ranks use alike: secrets masked in
what is printed, durations and sizes parsed and shown.
"""

from __future__ import annotations

import re

SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "PWD", "PASS", "CREDENTIAL",
                "AUTH", "AUTHORIZATION", "PRIVATE", "COOKIE", "SESSION", "SIGNATURE", "CERT", "PIN", "SALT")


def is_secret(key: str) -> bool:
    """A name part (between '_') that is, or ends with, a secret word, in the singular or plural:
    WANDB_API_KEY, HF_TOKEN, LABS_DB_PASSWD, WANDB_ACCESS_CREDENTIALS, MY_APIKEY; not
    TOKENIZERS_PARALLELISM or HF_HUB_OFFLINE."""
    for part in key.upper().split("_"):
        part = part[:-1] if part.endswith("S") and len(part) > 3 else part
        if any(part.endswith(w) for w in SECRET_WORDS):
            return True
    return False


def mask(key: str, value: str) -> str:
    """Passed-through values whose name suggests a secret reach the ranks but are never printed;
    only the owner-only env file holds them."""
    return "***" if value and is_secret(key) else value


def parse_duration(text: str | int | float | None) -> float | None:
    """'3h50m', '90m', '45s', '1h', '2d', or seconds as a number -> seconds; None/''/0 -> None.
    Raises ValueError with the accepted forms."""
    if text is None or text == "" or text == 0:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError("it must be >= 0")
        return float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", s)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([dhms])", "", s).strip():
        raise ValueError("write it like 3h50m, 90m, 45s or a number of seconds")
    unit = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(float(n) * unit[u] for n, u in parts)


def fmt_bytes(n: float) -> str:
    if abs(n) >= 1024 ** 5:  # no machine's memory: say so (a huge int would overflow a float below)
        return "more than 1 PiB"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def parse_size(text: str) -> int:
    """'8GiB', '512MiB', '8GB', '8g', '1.5T', or bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 8GiB, 512MiB, 16GB)")
    n, unit, ib = float(m.group(1)), m.group(2), m.group(3)
    base = 1024 if (ib.startswith("i") or (unit and not ib)) else 1000
    return int(n * base ** " kmgt".index(unit or " ")) if unit else int(n)


def fmt_flops(x: float) -> str:
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if x >= scale:
            return f"{x / scale:,.1f} {unit}"
    return f"{x / 1e6:,.1f} MFLOP/s"
