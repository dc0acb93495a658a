"""A run directory: where each round's stages keep their outputs, and which experiment it belongs to.

Layout::

    runs/<name>/config.json        the config of the latest invocation (the experiment's identity)
    runs/<name>/<round>/<stage>/   each stage's artifacts and manifest.json (see pipeline/stages.py)
    runs/<name>/<round>/train_stage1.checkpoints/, ...  DeepSpeed checkpoints (resume after an interruption)
    <cache>/tokens/                the token stores (shared by runs and rounds; tokenize/stores.json lists a round's)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import distributed, log
from pipeline.atomic import read_json, write_json
from pipeline.base_model import resolve_model_path
from pipeline.config import RunConfig, to_dict
from pipeline.errors import LayerMoEError
from pipeline.store_index import STORES_FILE


class RoundNotReady(LayerMoEError):
    """A round's input model (the previous round's trained model) does not exist yet."""


def stage_dir(config: RunConfig, round_index: int, stage: str) -> Path:
    """The directory of pipeline stage ``stage`` (e.g. ``train_stage1``) of round ``round_index``."""
    return config.run_path / config.rounds[round_index].name / stage


def stores_file(config: RunConfig, round_index: int) -> Path:
    """The tokenize stage's list of round ``round_index``'s token stores (``pipeline/store_index.py``)."""
    return stage_dir(config, round_index, "tokenize") / STORES_FILE


def trained_model_dir(config: RunConfig, round_index: int) -> Path:
    """Where round ``round_index``'s final (stage-2 trained) expanded model lives."""
    return stage_dir(config, round_index, "train_stage2") / "model"


def round_input_model(config: RunConfig, round_index: int) -> Path:
    """The model a round starts from: the base model for the first round, else the previous round's result."""
    if round_index == 0:
        return resolve_model_path(config.model, config.cache_path)
    previous = trained_model_dir(config, round_index - 1)
    if not previous.is_dir():
        raise RoundNotReady(f"round {config.rounds[round_index].name!r} starts from round "
                            f"{config.rounds[round_index - 1].name!r}'s trained model at {previous}, which does not exist")
    return previous


def experiment_identity(config: dict) -> dict:
    """What makes two configs the same experiment (a config as a dict, as in ``<run_dir>/config.json``): the
    base model, the languages it knows, and where the text comes from and how it is split (``data.sources``
    are compared separately: a later round may add languages). Everything else (steps, learning rates,
    allocation, evaluation, layout) may change between invocations: the stages it concerns re-run, as their
    manifests record."""
    return {"model.path": config["model"]["path"], "old_languages": config["old_languages"],
            **{f"data.{k}": config["data"][k] for k in ("builtin_corpus", "heldout_fraction", "split_seed")}}


def claim_run_dir(config: RunConfig, start_over: bool = False) -> None:
    """Make ``config.run_path`` this config's run directory, refusing one made by a different experiment
    (``experiment_identity``, and rounds that disagree on a common prefix; adding rounds is the lifelong
    case and is fine) unless ``start_over``, which deletes it first. Writes ``config.json``."""
    path, saved_file = config.run_path, config.run_path / "config.json"
    if start_over and path.exists():
        if distributed.current().is_main:
            log.warn(f"--start-over: deleting {path}")
            shutil.rmtree(path)
        distributed.barrier()
    elif saved_file.is_file():
        saved, mine = read_json(saved_file, "run config"), to_dict(config)
        old, new = experiment_identity(saved), experiment_identity(mine)
        differences = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new[k]]
        differences += [f"data.sources.{lang}: {source} -> {mine['data']['sources'].get(lang)}"
                        for lang, source in saved["data"]["sources"].items() if mine["data"]["sources"].get(lang) != source]
        differences += [f"rounds[{i}]: {a['name']} {a['languages']} -> {b['name']} {b['languages']}"
                        for i, (a, b) in enumerate(zip(saved["rounds"], mine["rounds"]))
                        if (a["name"], a["languages"]) != (b["name"], b["languages"])]
        if differences:
            raise LayerMoEError(f"{path} holds a run of a different experiment ({'; '.join(differences)}); "
                                f"use another name (name=...) or run_dir, or `layermoe run ... --start-over` to "
                                f"delete it and start again")
    if distributed.current().is_main:
        path.mkdir(parents=True, exist_ok=True)
        write_json(saved_file, to_dict(config))
    distributed.barrier()
