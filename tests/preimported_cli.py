"""``python -m pipeline.cli ...`` for the tests without paying its imports each time.

Every fresh ``python -m pipeline.cli`` spends ~6 s of CPU importing torch, transformers and DeepSpeed before it
does anything; the suite starts several dozen of them, which on two cores is minutes. A server process (one per
pytest worker) imports them once and, for each command, forks a child that runs ``pipeline.cli`` as ``__main__``
exactly as ``python -m`` would: the command's argv, working directory and environment, its own stdin/stdout/stderr
(the test's pipes, passed over a Unix socket), the output the imports printed, fresh random seeds, file
descriptors above 2 closed, and the normal interpreter exit (atexit, flushing, exit status or signal). The child
is a real process: signals, its own children and its exit status behave as a fresh one's.

A server serves one environment (what is read at import time cannot differ): a command in another one gets a
server of its own. The caller keeps fresh processes for anything that measures a process (memory, startup) or
starts it another way.

    python tests/preimported_cli.py SOCKET      # the server: prints "ready" on stdout once the imports are done
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORED_VARIABLES = ("PYTEST_CURRENT_TEST",)  # differs per test, read by nobody at import time


def comparable(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in IGNORED_VARIABLES}


# ------------------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------------------

def import_capturing_output() -> tuple[bytes, bytes]:
    """Import the libraries ``pipeline.cli`` imports; return what the imports wrote to stdout and stderr.

    The project's own modules are imported too and then dropped from ``sys.modules``: each child imports them
    afresh (under a second), so their module-level state (times, registries, signal and exit hooks) is a fresh
    process's; only the libraries' is inherited, as by any process forked after importing torch (DataLoader
    workers, multiprocessing's fork start method). One trace remains: pipeline.atomic's exit hook from the
    server's copy, which runs in the child on an empty list of temporaries."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            import pipeline.cli  # noqa: F401

            for name in [name for name in sys.modules if name == "pipeline" or name.startswith("pipeline.")]:
                del sys.modules[name]
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return out.read(), err.read()


def run_in_child(request: dict, fds: list[int], printed: tuple[bytes, bytes]) -> None:
    """In the forked child: become ``python -m pipeline.cli ARGS`` and never return (SystemExit unwinds to the
    top of this script, where the interpreter exits as a fresh one would)."""
    import random
    import runpy

    import numpy as np

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    random.seed()
    np.random.seed()
    os.write(1, printed[0])
    os.write(2, printed[1])
    sys.argv = [str(ROOT / "pipeline" / "cli.py"), *request["args"]]
    sys.path[0] = os.getcwd()  # as ``python -m`` sets it
    runpy.run_module("pipeline.cli", run_name="__main__", alter_sys=True)
    raise SystemExit(0)


def serve(path: str) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # as run_child's fresh processes: no core files
    sys.path[0] = str(ROOT)
    printed = import_capturing_output()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.settimeout(2.0)
    parent = os.getppid()
    print("ready", flush=True)
    while os.getppid() == parent:  # ends with the pytest worker that started it, however that ends
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        pid = os.fork()
        if pid == 0:
            listener.close()
            conn.close()
            run_in_child(json.loads(message), fds, printed)
        for fd in fds:
            os.close(fd)
        conn.sendall(f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        conn.close()


# ------------------------------------------------------------------------------------------------------------
# the client (in the pytest worker)
# ------------------------------------------------------------------------------------------------------------

class PreimportedProcess:
    """A command run by the server, with the part of :class:`subprocess.Popen` that ``run_child`` uses: ``pid``,
    ``communicate(timeout)`` (text, universal newlines; again after a ``TimeoutExpired``) and ``returncode``."""

    def __init__(self, server: "Server", args: list[str], cwd: str, env: dict[str, str], stdin: int | None):
        self.args = args
        self.returncode: int | None = None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        stdin_fd = os.open(os.devnull, os.O_RDONLY) if stdin == subprocess.DEVNULL else os.dup(0)
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(server.path)
        request = {"args": args[3:], "cwd": cwd, "env": env}
        socket.send_fds(self._conn, [json.dumps(request).encode()], [stdin_fd, out_w, err_w])
        for fd in (stdin_fd, out_w, err_w):
            os.close(fd)
        self._reply = b""
        while b"\n" not in self._reply:
            if not (data := self._conn.recv(64)):
                raise RuntimeError(f"the preimported-cli server (pid {server.process.pid}) closed the connection "
                                   f"without starting {args[3:]}; exit status {server.process.poll()}")
            self._reply += data
        line, self._reply = self._reply.split(b"\n", 1)
        self.pid = int(line)
        self._chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
        self._selector = selectors.DefaultSelector()
        for fd in (out_r, err_r, self._conn.fileno()):
            self._selector.register(fd, selectors.EVENT_READ)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._selector.get_map():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            for key, _ in self._selector.select(left):
                fd = key.fd
                data = os.read(fd, 1 << 16)
                if fd == self._conn.fileno():
                    self._reply += data
                    if data:
                        continue
                    self.returncode = int(self._reply.strip())
                    self._selector.unregister(fd)
                    self._conn.close()
                elif data:
                    self._chunks[fd].append(data)
                else:
                    self._selector.unregister(fd)
                    os.close(fd)
        self._selector.close()
        out, err = (b"".join(chunks).decode().replace("\r\n", "\n").replace("\r", "\n")
                    for chunks in self._chunks.values())
        return out, err


class Server:
    """The server process for one environment, started on first use; stopped when this process exits."""

    def __init__(self, env: dict[str, str]):
        self.env = comparable(env)
        self._dir = tempfile.TemporaryDirectory(prefix="preimported-cli-")
        self.path = os.path.join(self._dir.name, "socket")
        self.process = subprocess.Popen([sys.executable, __file__, self.path], cwd=ROOT, env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        ready = self.process.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the preimported-cli server did not start (exit status {self.process.poll()})")

    @staticmethod
    def can_run(args: list[str], kwargs: dict) -> bool:
        """Whether ``run_child(args, **kwargs)`` can run in a server: ``python -m pipeline.cli``, nothing but the
        working directory, environment and stdin (inherited or /dev/null) given."""
        return (args[:3] == [sys.executable, "-m", "pipeline.cli"] and set(kwargs) <= {"cwd", "env", "stdin"}
                and kwargs.get("stdin") in (None, subprocess.DEVNULL))

    def serves(self, env: dict[str, str]) -> bool:
        """Whether a command with environment ``env`` may run here: the server imported in the same one."""
        return comparable(env) == self.env

    def start(self, args: list[str], cwd: str | Path | None = None, env: dict[str, str] | None = None,
              stdin: int | None = None) -> PreimportedProcess:
        return PreimportedProcess(self, args, str(cwd or os.getcwd()), dict(env or os.environ), stdin)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self._dir.cleanup()


if __name__ == "__main__":
    serve(sys.argv[1])
