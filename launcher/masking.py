"""Which passed-through environment values are secrets, and how they are shown: `***`.

One small module that the plan, the backends and `labs launch` use alike (no import cycle).
"""

from __future__ import annotations

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
