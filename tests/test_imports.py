"""Import-time behaviour: DeepSpeed chooses its accelerator when it is first imported, so every way this package
imports it must choose first (the CPU when torch sees no GPU); the modules that need no torch import without it
(a process that forks often, or a quick command, does not pay for torch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from conftest import clean_env, run_child

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.abc, json, os, sys
seen = {}
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        caller = sys._getframe(1).f_back  # an import's loader, or importlib.util.find_spec asking if it is there
        if name == "deepspeed" and "deepspeed" not in seen and caller.f_code.co_name == "_find_and_load_unlocked":
            seen["deepspeed"] = os.environ.get("DS_ACCELERATOR")
        return None
sys.meta_path.insert(0, Spy())
import pipeline.atomic, pipeline.config, pipeline.errors
without_torch = "torch" not in sys.modules
import importlib
importlib.import_module(sys.argv[1])
print(json.dumps({"without_torch": without_torch, "deepspeed": seen.get("deepspeed", "not imported")}))
"""


def probe(module: str) -> dict:
    env = {k: v for k, v in clean_env().items() if k != "DS_ACCELERATOR"}
    proc = run_child([sys.executable, "-c", PROBE, module], cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_deepspeed_is_first_imported_with_its_accelerator_chosen_and_light_modules_need_no_torch():
    expected = None if torch.cuda.is_available() else "cpu"
    for module in ("pipeline.cli", "pipeline.expert_parallel"):
        result = probe(module)
        assert result == {"without_torch": True, "deepspeed": expected}, (module, result)
