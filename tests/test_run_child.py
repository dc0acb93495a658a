"""The tests' child-process runner (conftest.run_child): a child that hangs fails the test with the stack of every
process it started, so a CI log says where a hang was."""

from __future__ import annotations

import sys

import pytest

from conftest import clean_env, run_child

HANGS = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time\\ndef grandchild_waits():\\n    time.sleep(60)\\ngrandchild_waits()"])
def parent_waits():
    child.wait()
parent_waits()
"""


def test_a_hung_child_fails_with_the_stacks_of_its_processes():
    with pytest.raises(pytest.fail.Exception) as failure:
        run_child([sys.executable, "-c", HANGS], env=clean_env(), timeout=10)
    message = str(failure.value)
    assert "still ran after 10 s" in message and "of its 2 processes" in message
    assert "parent_waits" in message and "grandchild_waits" in message  # both stacks, from faulthandler


def test_a_child_that_finishes_is_returned_as_subprocess_run_returns_it():
    proc = run_child([sys.executable, "-c", "import sys; print('out'); sys.exit('err')"], timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "out\n", "err\n")
