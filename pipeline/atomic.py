"""Artifacts on disk: atomic writes (a reader sees the old artifact or the complete new one, never a half-written
file), checked JSON reads, and the removal of the temporaries a killed process leaves behind.

Temporaries are named after their target: ``.<name>.<8 random characters>.tmp`` (a file being written, or a
directory being filled) and ``.<name>.old-<pid>`` (the replaced directory, for the moment between two renames).
Every temporary is registered in the same uninterruptible step that creates it (a stop signal: Ctrl-C, SIGTERM,
SIGUSR1 waits for that step and for the two renames of a directory) and stays registered until it is renamed into
place or removed; when the process exits, after an interruption too, it removes what is still registered. What a
killed process (SIGKILL) leaves is cleared by :func:`remove_temporaries`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import LayerMoEError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGUSR1 are only recorded; at its end the previous handlers are back
    and each recorded signal is raised again, so it acts as if it had arrived just after the block. Used for the
    short steps that must not be split (creating a temporary and taking note of its name, two renames). Ignored
    signals stay ignored; a signal whose handler was installed outside Python is not deferred (Python could not put
    that handler back); only the main thread handles signals, elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    try:
        for sig in _DEFERRED_SIGNALS:
            if signal.getsignal(sig) not in (signal.SIG_IGN, None):  # None: a handler installed outside Python
                previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


_LIVE: dict[Path, int] = {}  # temporaries not yet renamed into place or removed -> the pid of their creator


@atexit.register
def _remove_live_temporaries() -> None:
    """At exit, remove this process's temporaries that are still registered (a signal was acted on in a window
    the clean-up code could not cover, e.g. on the first instruction of a ``__exit__``)."""
    for path, pid in list(_LIVE.items()):
        if pid == os.getpid():
            _remove(path)


def _remove(path: Path) -> None:
    """Remove the temporary ``path`` (file or directory) and unregister it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    _LIVE.pop(path, None)


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with _signals_deferred():
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            tmp = Path(name)
            _LIVE[tmp] = os.getpid()
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with _signals_deferred():
            os.replace(tmp, path)
            _LIVE.pop(tmp)
    except BaseException:
        if tmp is not None:
            with _signals_deferred():
                _remove(tmp)
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


class atomic_directory:  # noqa: N801 (used like a function: ``with atomic_directory(path) as tmp``)
    """``with atomic_directory(final) as tmp``: ``tmp`` is a fresh temporary directory beside ``final``; on success
    it replaces ``final`` as a whole, with the permissions the umask gives (:func:`normal_permissions`).

    On an exception (or a stop signal) the temporary directory is removed and ``final`` is left as it was."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        with _signals_deferred():
            self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.", suffix=".tmp"))
            _LIVE[self.tmp] = os.getpid()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                normal_permissions(self.tmp)
                with _signals_deferred():
                    if self.final.exists():
                        os.replace(self.final, self.old)
                    os.replace(self.tmp, self.final)
                    _LIVE.pop(self.tmp)
                    shutil.rmtree(self.old, ignore_errors=True)
                return
        except BaseException:
            self._undo()
            raise
        self._undo()

    def _undo(self) -> None:
        """Remove the temporary directory; if ``final`` was moved aside and not replaced, put it back."""
        with _signals_deferred():
            if self.old.exists() and not self.final.exists():
                os.replace(self.old, self.final)
            _remove(self.tmp)


_TEMPORARY = re.compile(r"^\..+(\.[A-Za-z0-9_]{8}\.tmp|\.old-\d+)$")
_REPLACED = re.compile(r"^\.(.+)\.old-\d+$")


@dataclasses.dataclass
class Leftovers:
    """What :func:`remove_temporaries` found: the temporaries it removed, and the replaced directories it renamed
    back to their names (their replacement never arrived)."""
    removed: list[Path]
    restored: list[Path]


def remove_temporaries(root: Path) -> Leftovers:
    """Remove, under ``root``, the temporaries of this module's writes (see the module docstring).
    A replaced directory whose replacement never arrived (``.<name>.old-<pid>`` without ``<name>``: the process
    was killed between the two renames) is renamed back to ``<name>`` instead: it is the last complete output.

    Only call it while no process can be writing under ``root`` (the run directory's lock is held): the
    temporaries found then belong to processes that died before they could clean up."""
    found = Leftovers(removed=[], restored=[])
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [n for n in dirnames if _TEMPORARY.match(n)]:
            dirnames.remove(name)
            path = Path(dirpath) / name
            replaced = _REPLACED.match(name)
            if replaced and not (target := Path(dirpath) / replaced.group(1)).exists():
                os.replace(path, target)
                found.restored.append(target)
                continue
            shutil.rmtree(path)
            found.removed.append(path)
        for name in filenames:
            if _TEMPORARY.match(name):
                os.unlink(Path(dirpath) / name)
                found.removed.append(Path(dirpath) / name)
    return found
