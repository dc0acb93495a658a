"""scripts/gpu_check.sh: one clear line and exit 2 without a GPU; its CPU plumbing mode (GPU_CHECK_CPU=1) runs
every step (kernel tests in the interpreter, 2-rank stage 1 and 2 with ep_size 2, a 2-rank evaluate, the CPU
benchmark) and prints the summary table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import clean_env, run_child

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return run_child(["bash", str(SCRIPT)], cwd=ROOT, timeout=900,
                     env={**clean_env(), "PYTHON": sys.executable, "GPU_CHECK_DIR": str(tmp_path / "check"), **env})


def test_without_a_gpu_it_exits_2_with_one_line(tmp_path):
    proc = run_script(tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1 and "no NVIDIA GPU" in proc.stderr
    assert not (tmp_path / "check").exists()


def test_cpu_plumbing_mode_runs_every_step(tmp_path):
    proc = run_script(tmp_path, GPU_CHECK_CPU="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.split()[:2] == ["check", "result"]) + 1:]
    checks = {line.split()[0]: line.split()[1] for line in table}
    assert checks == dict.fromkeys(["kernel_tests", "prepare_round", "train_stage1", "train_stage2", "evaluate",
                                    "moe_cpu_benchmark"], "ok"), proc.stdout
    assert "passed" in table[0] and "loss" in table[2] and "ppl" in table[4]
    run = tmp_path / "check" / "run" / "g1"
    evaluated = json.loads((run / "evaluate" / "report.json").read_text())
    assert set(evaluated["group_average"]) == {"base", "g1"}
    launch = (tmp_path / "check" / "logs" / "train_stage1.log").read_text()
    assert "world 2, ep_size 2" in launch
