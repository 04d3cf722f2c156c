"""Atomic file writes: a failed or killed run never leaves a half-written checkpoint or report.

JSON is written without NaN (undefined measures become null), so any JSON reader accepts it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile


def ensure_dir(path: str, option: str = "--out") -> str:
    """Creates directory ``path`` if needed; a file in its place is a user error naming ``option``."""
    from divfast.errors import DivfastError

    if os.path.exists(path) and not os.path.isdir(path):
        raise DivfastError(f"{option}: {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise DivfastError(f"{option}: cannot create directory {path!r} ({exc.strerror})") from exc
    return path


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside ``path``; on success it is fsynced and renamed over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(obj):
    """``obj`` with NaN and infinities replaced by None, so the JSON is standard (RFC 8259)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_text_atomic(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")
