"""``layermoe baselines``: LayerMoE against its baselines on a config's first round, over several seeds.

Every (method, seed) is an ordinary run (``layermoe run CONFIG`` with the method's overrides) in its own
directory ``<output>/<method>-s<seed>``, run in a child process; a run whose report exists is skipped. All runs
share the config's model, data, steps and schedules; the methods differ only in what expands or trains:

=================  ==========================================================================================
dense_full         every weight of the dense model trains (``expansion: dense_full``)
dense_ffn          the FFN weights of the dense model train (``expansion: dense_ffn``)
lora               LoRA adapters (peft) on every linear layer, merged at export (``expansion: lora``)
moe_lpr            MoE-LPR: 2 experts per layer (1 new), no classifier (``allocate.method: uniform``)
layermoe           LayerMoE with the config's allocation (the default job: reference, delta 45, 7 classifiers)
layermoe_budget    LayerMoE at MoE-LPR's budget: as many new experts as moe_lpr (one per layer), shared by
                   similarity with no floor (``allocate.method: budget``, ``min_new_experts: 0``), 7 classifiers
layermoe_recipe    ``layermoe`` with ``recipe: reference`` (the authors' loss forms and pooling); not run by
                   default, it measures what the project's defaults change
=================  ==========================================================================================

The dense methods have no stage-specific parameters: "stage 2" trains the same parameters on the stage-2 mix
(new languages + replay) with CE alone, at the stage-1 learning rate (the stage-2 rate is sized for routers).
Each report holds the stage-1 and the final model (``evaluate.include_stage1_models``), so each method is shown
with and without stage 2; the few-shot translation test is off (the comparison reads perplexities). After a run its training checkpoints are deleted (they only serve to resume an
interrupted stage) unless ``keep_checkpoints``. The comparison (``pipeline.method_comparison``) goes to
``<output>/comparison.md``, ``comparison.json`` and ``comparison.png``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline import log
from pipeline.atomic import write_json, write_text
from pipeline.base_model import read_model_config, resolve_model_path
from pipeline.config import RECIPES, RunConfig, load_config
from pipeline.errors import LayerMoEError
from pipeline.method_comparison import compare_methods, methods_markdown, plot_gain_vs_forgetting

UNIFORM_EXPERTS = 2  # MoE-LPR's experts per layer here (one new expert per layer)


@dataclass(frozen=True)
class Method:
    """A compared method: its name and the config overrides that make a run of it (from the base config and the
    dense model's number of layers)."""

    name: str
    overrides: Callable[[RunConfig, int], list[str]]


def _dense(expansion: str) -> Callable[[RunConfig, int], list[str]]:
    return lambda config, layers: [f"expansion={expansion}", f"train.stage2.lr={config.train.stage1.lr}"]


def _layermoe(config: RunConfig, layers: int) -> list[str]:
    return []  # the config's own allocation


def _moe_lpr(config: RunConfig, layers: int) -> list[str]:
    return ["allocate.method=uniform", f"allocate.experts_per_layer={UNIFORM_EXPERTS}", "allocate.classifier_count=0",
            "allocate.classifier_layers=null"]


def _layermoe_budget(config: RunConfig, layers: int) -> list[str]:
    return ["allocate.method=budget", f"allocate.budget={layers * (UNIFORM_EXPERTS - 1)}", "allocate.min_new_experts=0"]


def _layermoe_recipe(config: RunConfig, layers: int) -> list[str]:
    return [f"{key}={value}" for key, value in RECIPES["reference"].items()]


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dense_full", _dense("dense_full")),
    Method("dense_ffn", _dense("dense_ffn")),
    Method("lora", _dense("lora")),
    Method("moe_lpr", _moe_lpr),
    Method("layermoe", _layermoe),
    Method("layermoe_budget", _layermoe_budget),
    Method("layermoe_recipe", _layermoe_recipe),
)}
DEFAULT_METHODS = [name for name in METHODS if name != "layermoe_recipe"]


def _round1(config: RunConfig) -> str:
    first = config.rounds[0]
    return f"rounds=[{{name: {first.name}, languages: [{', '.join(first.languages)}]}}]"


def run_overrides(config: RunConfig, method: Method, seed: int, output: Path, layers: int) -> list[str]:
    """The overrides of one (method, seed) run: its name and directory, the seed, round 1 only, the stage-1
    model evaluated too, no translation test (the comparison reads perplexities), one evaluation cache for all
    runs (its keys hash the model's content, so the base model is scored once), and the method's own."""
    return [f"name={method.name}-s{seed}", f"run_dir={output}/{{name}}", f"seed={seed}", _round1(config),
            "evaluate.include_stage1_models=true", "evaluate.translation_sentences=0",
            f"evaluate.cache_dir={output}/.evaluate_cache", *method.overrides(config, layers)]


def run_baselines(config_file: Path, overrides: list[str], seeds: list[int], methods: list[str], output: Path,
                  keep_checkpoints: bool = False) -> Path:
    """Run every (method, seed) that has no report yet, then write the comparison; returns comparison.md."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise LayerMoEError(f"--methods: unknown {unknown}; choose from {list(METHODS)}" if unknown else "no methods")
    if not seeds:
        raise LayerMoEError("--seeds: at least one seed")
    config = load_config(config_file, overrides)
    layers = read_model_config(resolve_model_path(config.model, config.cache_path))["num_hidden_layers"]
    output = Path(output)
    (output / "logs").mkdir(parents=True, exist_ok=True)
    run_dirs = []
    for method in methods:
        for seed in seeds:
            extra = run_overrides(config, METHODS[method], seed, output, layers)
            run_dir = load_config(config_file, [*overrides, *extra]).run_path
            run_dirs.append(run_dir)
            _run_one(config_file, [*overrides, *extra], run_dir, output / "logs" / f"{run_dir.name}.log",
                     config.rounds[0].name, keep_checkpoints)
    rows = compare_methods(run_dirs)
    table = methods_markdown(rows)
    write_json(output / "comparison.json", {"config": str(config_file), "overrides": overrides, "seeds": seeds,
                                            "rows": [r.to_json() for r in rows]})
    write_text(output / "comparison.md", f"# {config.rounds[0].name}: methods over seeds {seeds}\n\n{table}\n\n"
                                          f"![gain vs forgetting](comparison.png)\n")
    plot_gain_vs_forgetting(rows, output / "comparison.png")
    print(table, flush=True)
    log.info(f"comparison written to {output / 'comparison.md'} and {output / 'comparison.png'}")
    return output / "comparison.md"


def _run_one(config_file: Path, overrides: list[str], run_dir: Path, log_file: Path, round_name: str,
             keep_checkpoints: bool) -> None:
    """One ``layermoe run`` in a child process (its output in ``log_file``), unless its report exists."""
    if (run_dir / round_name / "evaluate" / "report.json").is_file():
        log.info(f"baselines: {run_dir.name} is finished, skipped")
        return
    log.info(f"baselines: running {run_dir.name} (log: {log_file})")
    started = time.perf_counter()
    with log_file.open("a") as out:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config_file), *overrides],
                              stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise LayerMoEError(f"baselines: run {run_dir.name} failed (exit status {proc.returncode}); see {log_file}")
    log.info(f"baselines: {run_dir.name} done in {time.perf_counter() - started:.0f}s")
    if not keep_checkpoints:
        for checkpoints in (run_dir / round_name).glob("train_stage*.checkpoints"):
            shutil.rmtree(checkpoints)
