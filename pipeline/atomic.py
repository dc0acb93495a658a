"""Artifacts on disk: atomic writes (a reader sees the old artifact or the complete new one, never a half-written
file), checked JSON reads, and the removal of the temporaries a killed process leaves behind.

Temporaries are named after their target: ``.<name>.<8 random characters>.tmp`` (a file being written, or a
directory being filled) and ``.<name>.old-<pid>`` (the replaced directory, for the moment between two renames).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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


def cannot_write(path: Path, error: BaseException) -> LayerMoEError:
    """The one-line error for a failed write of ``path`` (e.g. a full disk): the cause and the space left there."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"; {shutil.disk_usage(where).free / 2**20:,.1f} MiB free there"
    except OSError:
        free = ""
    return LayerMoEError(f"cannot write {path}: {type(error).__name__}: {str(error)[:200]}{free}")


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str, hint: str = "", fix: str = "") -> Any:
    """The JSON content of ``path``. A missing file or invalid JSON is a ``LayerMoEError`` naming ``what`` (e.g.
    "allocation file") and the path; ``hint`` is appended to the missing-file message, ``fix`` to the others."""
    path = Path(path)
    if not path.is_file():
        raise LayerMoEError(f"{what} {str(path)!r} does not exist{hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LayerMoEError(f"{what} {path} is not valid JSON (not UTF-8 text: byte {e.object[e.start]:#04x} at "
                            f"offset {e.start}){fix}") from None
    except json.JSONDecodeError as e:
        raise LayerMoEError(f"{what} {path} is not valid JSON ({e}){fix}") from None


def read_json_object(path: Path, what: str, required: tuple[str, ...] = (), fix: str = "") -> dict:
    """Like :func:`read_json` for a file that must hold a JSON object with the keys ``required``; anything else
    is a ``LayerMoEError`` naming the file and what is wrong, with ``fix`` (what to do) appended."""
    doc = read_json(path, what, fix=fix)
    if not isinstance(doc, dict):
        raise LayerMoEError(f"{what} {path} is not a JSON object (it holds a {type(doc).__name__}){fix}")
    missing = [key for key in required if key not in doc]
    if missing:
        raise LayerMoEError(f"{what} {path} lacks {', '.join(map(repr, missing))}: not a {what} of this project{fix}")
    return doc


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


_TEMPORARY = re.compile(r"^\..+(\.[A-Za-z0-9_]{8}\.tmp|\.old-\d+)$")


def remove_temporaries(root: Path) -> list[Path]:
    """Remove, under ``root``, the temporaries of this module's writes (see the module docstring) and return them.

    Only call it while no process can be writing under ``root`` (the run directory's lock is held): the
    temporaries found then belong to processes that died before they could clean up."""
    removed = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [n for n in dirnames if _TEMPORARY.match(n)]:
            dirnames.remove(name)
            shutil.rmtree(Path(dirpath) / name)
            removed.append(Path(dirpath) / name)
        for name in filenames:
            if _TEMPORARY.match(name):
                os.unlink(Path(dirpath) / name)
                removed.append(Path(dirpath) / name)
    return removed
