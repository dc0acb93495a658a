"""Progress and status output: one timestamped, prefixed line per event on stderr (rank 0 only under
torch.distributed; errors on every rank), a heartbeat during long silent phases, quiet third-party libraries, and
the copy of a whole run's output in a log file (:func:`tee_output`)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

INTERACTIVE_ENV = "LAYERMOE_INTERACTIVE"  # "1"/"0": whether the user's stderr is a terminal (children inherit it)
HEARTBEAT_SECONDS = 30.0

_last_line = {"time": time.monotonic(), "message": ""}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def timestamp() -> str:
    return time.strftime("%H:%M:%S")


def _emit(message: str) -> None:
    _last_line.update(time=time.monotonic(), message=message)
    prefix = f"[layermoe {timestamp()}]"
    print("\n".join(f"{prefix} {line}" for line in message.split("\n")), file=sys.stderr, flush=True)


def info(message: str) -> None:
    """Print a status line (rank 0 only)."""
    if _rank() == 0:
        _emit(message)


def warn(message: str) -> None:
    """Print a warning line (rank 0 only)."""
    if _rank() == 0:
        _emit(f"WARNING: {message}")


def error(message: str) -> None:
    """Print an error line (every rank: errors must never be hidden)."""
    _emit(f"ERROR: {message}")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """45 -> '45s', 185 -> '3m05s', 3725 -> '1h02m'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def interactive() -> bool:
    """Whether output goes to a person's terminal (progress bars make sense), also in a child process whose
    stderr is a pipe into this package's log file."""
    inherited = os.environ.get(INTERACTIVE_ENV)
    return inherited == "1" if inherited in ("0", "1") else sys.stderr.isatty()


def quiet_libraries() -> None:
    """Third-party output down to warnings and errors; no progress bars unless on a terminal. Also for the
    processes this one starts (environment variables)."""
    os.environ.setdefault(INTERACTIVE_ENV, "1" if interactive() else "0")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    if not interactive():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets
    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    if not interactive():
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
    import logging

    for name in ("DeepSpeed", "lm-eval", "lm_eval", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def heartbeat(every: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """While inside, whenever this process printed no status line for ``every`` seconds, print one saying what
    it is still busy with (model loading, DeepSpeed set-up, a first step, ...). Rank 0 only; the thread stops
    when the block ends (also in a process that runs several commands, as the tests do)."""
    if _rank() != 0:
        yield
        return
    done = threading.Event()

    def beat() -> None:
        while not done.wait(min(every / 6, 5.0)):
            silent = time.monotonic() - _last_line["time"]
            if silent >= every:
                busy = _last_line["message"].split("\n")[0]
                busy = busy if len(busy) <= 100 else busy[:97] + "..."
                _emit(f"... still working ({duration(silent)} since: {busy})")
                _last_line["message"] = busy  # keep naming the activity, not the heartbeat

    thread = threading.Thread(target=beat, name="layermoe-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# ----------------------------------------------------------------------------------------------------------
# The log file of a run
# ----------------------------------------------------------------------------------------------------------


_TERMINAL_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # cursor movements and colours of progress bars


def _file_line(raw: bytes) -> str:
    """A line as the log file keeps it: what a terminal would show last (after the last carriage return, without
    control sequences), with a timestamp unless it has this package's prefix."""
    text = _TERMINAL_CONTROL.sub("", raw.decode("utf-8", errors="replace")).rstrip("\r").split("\r")[-1].rstrip()
    return text if text.startswith("[layermoe ") or not text else f"[{timestamp()}] {text}"


def _pump(read_fd: int, terminal_fd: int, file, lock: threading.Lock) -> None:
    """Copy everything written to a pipe to the terminal (unchanged) and, line by line, to ``file``."""
    pending, terminal = b"", True
    while chunk := os.read(read_fd, 65536):
        if terminal:
            try:
                os.write(terminal_fd, chunk)
            except OSError:  # the terminal went away: keep the file (and never block the writers)
                terminal = False
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if lines:
            with lock:
                file.write("".join(_file_line(line) + "\n" for line in lines))
                file.flush()
    if pending:
        with lock:
            file.write(_file_line(pending) + "\n")
    os.close(read_fd)


@contextlib.contextmanager
def tee_output(path: Path) -> Iterator[Path]:
    """Copy this process's stdout and stderr, and those of every process it starts, into ``path`` while they
    still reach the terminal. The file gets no carriage returns (a progress bar keeps its last state) and a
    timestamp on every line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(INTERACTIVE_ENV, "1" if interactive() else "0")  # before stderr becomes a pipe
    sys.stdout.flush()
    sys.stderr.flush()
    lock = threading.Lock()
    with path.open("a", encoding="utf-8") as file:
        saved, pumps = {}, []
        for fd in (1, 2):
            saved[fd] = os.dup(fd)
            read_fd, write_fd = os.pipe()
            os.dup2(write_fd, fd)
            os.close(write_fd)
            pumps.append(threading.Thread(target=_pump, args=(read_fd, saved[fd], file, lock), daemon=True))
            pumps[-1].start()
        try:
            yield path
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd in (1, 2):
                os.dup2(saved[fd], fd)  # closes the pipe's last write end: its pump reaches the end
            for pump in pumps:
                pump.join(timeout=10)
            for fd in saved.values():
                os.close(fd)
