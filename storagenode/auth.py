"""Authentication between parts: a shared cluster secret sent as a bearer token.

Every node and client of one cluster reads the same secret file.  Requests
carry ``Authorization: Bearer <secret>``; servers compare in constant time.
``/health`` and ``/metrics`` are open (for load balancers and Prometheus).
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

SECRET_BYTES = 32


class SecretError(Exception):
    """The secret file is missing, unreadable or malformed."""


def create_secret(path: Path) -> str:
    """Write a new random secret readable only by its owner (keeps an existing one)."""
    if path.exists():
        return load_secret(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(SECRET_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token


def load_secret(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise SecretError(f"cannot read secret file {path}: {exc.strerror}") from exc
    if len(token) < 16 or not token.isprintable() or " " in token:
        raise SecretError(f"secret file {path} does not hold a valid secret")
    return token


def auth_header(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def authorized(header_value: str | None, secret: str) -> bool:
    if not header_value or not header_value.startswith("Bearer "):
        return False
    return hmac.compare_digest(header_value[7:].encode(), secret.encode())
