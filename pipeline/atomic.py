"""Artifacts on disk: atomic writes (a reader sees the old artifact or the complete new one, never a half-written
file) and checked JSON reads."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import LayerMoEError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str, hint: str = "") -> Any:
    """The JSON content of ``path``. A missing file or invalid JSON is a ``LayerMoEError`` naming ``what`` (e.g.
    "allocation file") and the path; ``hint`` is appended to the missing-file message."""
    path = Path(path)
    if not path.is_file():
        raise LayerMoEError(f"{what} {str(path)!r} does not exist{hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LayerMoEError(f"{what} {path} is not valid JSON ({e})") from None


def normal_permissions(root: Path) -> None:
    """Give ``root`` and everything under it the permissions the umask gives new files (0644 / 0755 with the
    usual umask): some writers (safetensors, mkdtemp) create private 0600 / 0700 files, which other members of a
    group cannot read on a shared filesystem. Executable bits are kept."""
    mask = _umask()
    for path in [Path(root), *Path(root).rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        os.chmod(path, (0o777 if path.is_dir() else 0o666 | (mode & 0o111)) & ~mask)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; on success it replaces ``final`` as a whole, with the
    permissions the umask gives (:func:`normal_permissions`).

    On an exception the temporary directory is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        normal_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
