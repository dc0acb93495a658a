"""Atomic writes under real signals: a process interrupted (SIGINT) or killed (SIGKILL) at any point of a write
leaves the old output or the new one, complete, and after an interruption no temporary."""

import json
import sys
from pathlib import Path

from conftest import run_child

ROOT = Path(__file__).resolve().parents[1]

# Each attempt runs one write in a forked child, which gets a real signal part-way through:
# * SIGINT: an interval timer fires after d microseconds (d = 3, 6, 9, ... until writes end before it) and its
#   handler sends SIGINT, which Python then acts on wherever a real signal is acted on;
# * SIGKILL: sent at the k-th call or return event of the write (a profiler hook; k = 1, 2, ... until a write ends
#   before its k-th event), so every point where the process can die is tried.
# The parent checks what is on disk after each attempt: the old output or the new one, complete, and no temporary
# (after SIGINT: once the child has exited; after SIGKILL: once remove_temporaries, what the next run does, has run).
SCRIPT = r"""
import atexit, json, os, shutil, signal, sys
from pathlib import Path
from pipeline.atomic import atomic_directory, remove_temporaries, write_bytes

def write(root, kind):
    if kind == "file":
        write_bytes(root / "out", b"new")
        return
    with atomic_directory(root / "out") as tmp:
        (tmp / "a").write_text("new")
        (tmp / "b").write_text("new")

def state(root):
    names = sorted(p.name for p in root.iterdir())
    if names == []:
        return "none"
    if names != ["out"]:
        return f"stray files {names}"
    out = root / "out"
    content = out.read_text() if out.is_file() else json.dumps({p.name: p.read_text() for p in sorted(out.iterdir())})
    return {"old": "old", "new": "new", '{"a": "old", "b": "old"}': "old", '{"a": "new", "b": "new"}': "new"}.get(
        content, f"torn content {content}")

def prepare(root, kind, existing):
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    if existing and kind == "directory":
        (root / "out").mkdir()
        (root / "out" / "a").write_text("old")
        (root / "out" / "b").write_text("old")
    elif existing:
        (root / "out").write_text("old")

def interrupted_after(root, kind, microseconds):
    fired = []
    def alarm(signum, frame):
        fired.append(True)
        os.kill(os.getpid(), signal.SIGINT)
    signal.signal(signal.SIGALRM, alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, microseconds / 1e6)
        write(root, kind)
        signal.setitimer(signal.ITIMER_REAL, 0)
    except KeyboardInterrupt:
        return 1
    return 1 if fired else 3

def killed_at(root, kind, k):
    events = 0
    def hook(frame, event, arg):
        nonlocal events
        events += 1
        if events == k:
            os.kill(os.getpid(), signal.SIGKILL)
    sys.setprofile(hook)
    write(root, kind)
    sys.setprofile(None)
    return 3

def attempt(root, kind, how, point):
    pid = os.fork()
    if pid == 0:  # exits as a layermoe command does after Ctrl-C: a status, then the exit handlers run
        status = interrupted_after(root, kind, point) if how == "SIGINT" else killed_at(root, kind, point)
        atexit._run_exitfuncs()  # what the interpreter's exit runs first (the rest of it: 0.3 s with torch loaded)
        os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

root = Path(sys.argv[1]) / "w"
report = {}
for kind in ("directory", "file"):
    for existing in (True, False):
        for how, step in (("SIGINT", 3), ("SIGKILL", 1)):
            case, points, problems, ended = f"{kind} {'replaced' if existing else 'new'} {how}", 0, [], 0
            point = 0
            while ended < 5:  # SIGINT: five writes in a row that ended before the timer (timing noise)
                point += step
                prepare(root, kind, existing)
                if attempt(root, kind, how, point) == 3:
                    ended += 1
                    if how == "SIGKILL":
                        break
                    continue
                ended = 0
                points += 1
                if how == "SIGKILL":
                    remove_temporaries(root)
                found = state(root)
                if found not in ("old", "new") and not (found == "none" and not existing):
                    problems.append(f"{how} at {point}: {found}")
            report[case] = {"points": points, "problems": problems[:5]}
print(json.dumps(report))
"""


def test_a_write_interrupted_or_killed_at_any_point_leaves_the_old_or_the_new_output_and_no_temporary(tmp_path):
    proc = run_child([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert len(report) == 8
    for case, result in report.items():
        assert result["points"] > 20, (case, result)  # the hook did fire inside the write
        assert result["problems"] == [], (case, result)
