"""tests/preimported_cli.py: a ``python -m pipeline.cli`` command forked from the preimported server gives what a
fresh process gives (exit status, stdout, stderr), in the command's working directory and environment."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import clean_env, preimported_server, run_child
from preimported_cli import Server

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["--help"], ["allocate", "--similarity", "x.json", "--delta", "1", "--output", "o"]])
def test_a_command_gives_what_a_fresh_process_gives(tmp_path, args):
    command = [sys.executable, "-m", "pipeline.cli", *args]
    fresh, forked = (run_child(command, cwd=tmp_path, env=clean_env(), timeout=300, preimported=preimported)
                     for preimported in (False, True))
    untimed = [(p.returncode, p.stdout, re.sub(r"\d\d:\d\d:\d\d", "T", p.stderr)) for p in (fresh, forked)]
    assert untimed[0] == untimed[1]
    assert fresh.returncode in (0, 2) and fresh.stdout + fresh.stderr


def test_another_environment_gets_a_server_of_its_own(tmp_path):
    """What is read at import time must be what a fresh process would read: a command in another environment runs
    in a server started in that one."""
    command = [sys.executable, "-m", "pipeline.cli", "--help"]
    assert Server.can_run(command, {"cwd": ROOT, "env": clean_env()})
    assert not Server.can_run([sys.executable, "-c", "pass"], {"env": clean_env()})
    assert not Server.can_run(command, {"env": clean_env(), "stdout": None})
    server = preimported_server(clean_env())
    assert server.serves({**clean_env(), "PYTEST_CURRENT_TEST": "another test"})
    other_env = {**clean_env(), "TRANSFORMERS_VERBOSITY": "critical"}  # transformers reads it at import
    assert not server.serves(other_env)
    other = preimported_server(other_env)
    assert other is not server and other.serves(other_env) and server.process.poll() is not None  # replaced
    assert run_child(command, cwd=tmp_path, env=other_env, timeout=300, preimported=True).returncode == 0
    assert preimported_server(clean_env()).serves(clean_env())


def test_the_child_is_a_real_process_that_a_signal_ends(tmp_path):
    """SIGKILL to the child's pid (busy reading a long config) ends it with -9, as subprocess reports it."""
    config = tmp_path / "long.yaml"
    config.write_text("name: x\npad: [" + ", ".join(["1"] * 300_000) + "]\n")  # seconds of YAML parsing
    server = preimported_server(clean_env())
    process = server.start([sys.executable, "-m", "pipeline.cli", "run", str(config)], cwd=ROOT, env=clean_env())
    assert psutil.Process(process.pid).ppid() == server.process.pid
    time.sleep(0.5)
    os.kill(process.pid, signal.SIGKILL)
    out, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL and "unknown field" not in err
