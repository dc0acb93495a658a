"""Stopping on request: SIGTERM and SIGUSR1 (what a scheduler such as Slurm sends before a time limit or a
preemption), and SIGINT (Ctrl-C).

* Outside the training steps a stop signal raises :class:`StopRequested` where the process is (like Ctrl-C's
  ``KeyboardInterrupt``): the stage's temporary directory is removed, nothing half-written stays.
* During the training steps (:func:`deferred_stop_requests`) it only sets a flag; at the next step boundary all
  ranks agree (an all-reduce of the flag), save a checkpoint and stop with :class:`StopRequested`.
* A process that starts a launcher (the DeepSpeed launcher, which starts the ranks) keeps the launcher from
  acting on stop signals (:func:`launcher_ignores_stop_signals`) and forwards them to its processes as SIGUSR1
  (:func:`forwarding_stop_signals`), so that they reach the ranks, which decide.

Exit statuses of every ``layermoe`` command: 0 done; 2 a problem with the config, the inputs or the
environment (one line names it); 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGUSR1 at a safe point: run the same
command again to continue; 130 interrupted by SIGINT.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from typing import Iterator

import torch

from pipeline import distributed

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request at a safe point; the same command continues
EXIT_INTERRUPTED = 130  # SIGINT
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequested(BaseException):
    """A stop signal arrived. A ``BaseException`` like ``KeyboardInterrupt`` (it can be raised anywhere), so
    that no ``except Exception`` turns it into an error."""


def _install(handler) -> dict[int, object]:
    """Set ``handler`` for the stop signals; the previous handlers (to restore). Only the main thread can."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def _restore(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGUSR1 raise :class:`StopRequested` (the ``layermoe`` command's default)."""
    def handler(signum, frame):
        raise StopRequested(f"stopped by {signal.Signals(signum).name}")

    previous = _install(handler)
    try:
        yield
    finally:
        _restore(previous)


class StopFlag:
    """Whether a stop signal arrived in this process, and whether any rank got one (:meth:`agreed`)."""

    def __init__(self):
        self.signal_name: str | None = None
        self.interrupted = False  # SIGINT (forwarding only)

    def agreed(self) -> bool:
        """True on every rank when any rank got a stop signal (collective: every rank calls it at the same
        point, once per step)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=distributed.collective_device())
        return float(distributed.all_reduce_sum(flag)) > 0

    def describe(self) -> str:
        return f"{self.signal_name} (here or on another rank)" if self.signal_name else "a stop signal on another rank"


@contextlib.contextmanager
def deferred_stop_requests() -> Iterator[StopFlag]:
    """Within the block, SIGTERM and SIGUSR1 only set the yielded flag (the training steps check it)."""
    flag = StopFlag()

    def handler(signum, frame):
        flag.signal_name = signal.Signals(signum).name

    previous = _install(handler)
    try:
        yield flag
    finally:
        _restore(previous)


def launcher_ignores_stop_signals() -> None:
    """In a process about to become a launcher (``preexec_fn``, or before ``exec``): ignore the stop signals.
    An ignored signal stays ignored across ``exec`` and in children, so the launcher (which would kill the ranks)
    lets them pass; the ranks run ``layermoe``, which installs its own handlers."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def forwarding_stop_signals(process: subprocess.Popen) -> Iterator[StopFlag]:
    """While ``process`` (started with ``start_new_session=True``, so its process group is its pid) runs: a stop
    signal to this process is sent to that process group as SIGUSR1, and SIGINT as SIGINT. Yields a flag that
    says whether a stop signal or SIGINT arrived."""
    flag = StopFlag()

    def forward(signum, frame):
        if signum == signal.SIGINT:
            flag.interrupted = True
        else:
            flag.signal_name = signal.Signals(signum).name
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGUSR1)

    previous = _install(forward)
    if previous:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, forward)
    try:
        yield flag
    finally:
        _restore(previous)
