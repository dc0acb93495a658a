"""A run directory: where each round's stages keep their outputs, which experiment it belongs to, and who may
write in it.

Layout::

    runs/<name>/.layermoe-run.json  the marker: this project made the directory (format version, run name)
    runs/<name>/.lock               the run lock (pipeline/run_lock.py): one run at a time
    runs/<name>/config.json         the config of the latest invocation (the experiment's identity)
    runs/<name>/<round>/<stage>/    each stage's artifacts and manifest.json (see pipeline/stages.py)
    runs/<name>/<round>/train_stage1.checkpoints/, ...  DeepSpeed checkpoints (resume after an interruption)
    <cache>/tokens/                 the token stores (shared by runs and rounds; tokenize/stores.json lists a round's)

A directory is a run directory when it holds the marker, or, made by a version before the marker, a
``config.json`` that is a run config of this project (then it gets the marker). Only a run directory is ever
written into or deleted (``--start-over``); any other non-empty directory is refused, untouched.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Iterator

from pipeline import __version__, distributed, log
from pipeline.atomic import read_json_object, remove_temporaries, write_json
from pipeline.base_model import resolve_model_path
from pipeline.config import RunConfig, to_dict
from pipeline.errors import LayerMoEError
from pipeline.run_lock import LOCK_FILE, run_lock
from pipeline.store_index import STORES_FILE

MARKER = ".layermoe-run.json"
MARKER_FORMAT = 1
RUN_CONFIG_KEYS = ("name", "old_languages", "rounds", "model", "data")  # what a run config.json always has


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
        path = resolve_model_path(config.model, config.cache_path)
        if not path.is_dir():
            raise LayerMoEError(f"model.path: the base model directory {str(path)!r} does not exist (it should hold "
                                f"config.json, the weights and the tokenizer of a Hugging Face model)")
        return path
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


def _is_older_run(path: Path) -> bool:
    """Whether ``path`` is a run directory made before the marker existed: it has a run config.json."""
    try:
        doc = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and all(key in doc for key in RUN_CONFIG_KEYS)


def ownership_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as a run directory (None when it can: absent, empty, or a run directory)."""
    if not path.exists():
        return None
    if not path.is_dir():
        return f"{path} is not a directory"
    if (path / MARKER).is_file() or _is_older_run(path) or not [p for p in path.iterdir() if p.name != LOCK_FILE]:
        return None
    return (f"{path} is not a LayerMoE run directory: it holds files and neither {MARKER} nor a run config.json; "
            f"nothing was changed")


def mark_run_dir(config: RunConfig) -> None:
    """Create ``config.run_path`` (refusing a directory that is not a run directory) and its marker if absent."""
    path = config.run_path
    problem = ownership_problem(path)
    if problem:
        raise LayerMoEError(f"{problem}; choose another run_dir (or name=...)")
    if not (path / MARKER).is_file():
        if _is_older_run(path):
            log.info(f"{path}: a run directory of an older version (it has a run config.json); marking it as one")
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / MARKER, {"format": MARKER_FORMAT, "name": config.name, "layermoe": __version__,
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _start_over(path: Path) -> None:
    """Delete everything in run directory ``path`` except the lock this process holds."""
    log.warn(f"--start-over: deleting the contents of {path}")
    for entry in path.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _check_same_experiment(config: RunConfig, saved_file: Path) -> None:
    """Refuse ``config`` when the run config saved in ``saved_file`` is of a different experiment."""
    hint = "; restore it, or `layermoe run ... --start-over` to delete the run and start again"
    saved, mine = read_json_object(saved_file, "run config", RUN_CONFIG_KEYS, hint), to_dict(config)
    try:
        old, new = experiment_identity(saved), experiment_identity(mine)
        sources = saved["data"]["sources"].items()
        pairs = [(a["name"], a["languages"], b["name"], b["languages"]) for a, b in zip(saved["rounds"], mine["rounds"])]
    except (KeyError, TypeError, AttributeError) as e:
        raise LayerMoEError(f"run config {saved_file} is not a run config of this project ({type(e).__name__}: "
                            f"{e}){hint}") from None
    differences = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new[k]]
    differences += [f"data.sources.{lang}: {source} -> {mine['data']['sources'].get(lang)}"
                    for lang, source in sources if mine["data"]["sources"].get(lang) != source]
    differences += [f"rounds[{i}]: {a} {al} -> {b} {bl}" for i, (a, al, b, bl) in enumerate(pairs) if (a, al) != (b, bl)]
    if differences:
        raise LayerMoEError(f"{config.run_path} holds a run of a different experiment ({'; '.join(differences)}); "
                            f"use another name (name=...) or run_dir, or `layermoe run ... --start-over` to "
                            f"delete it and start again")


@contextlib.contextmanager
def claimed_run_dir(config: RunConfig, start_over: bool = False) -> Iterator[None]:
    """Make ``config.run_path`` this config's run directory for the block, and hold its lock (main rank; the other
    ranks rely on it). Refuses a directory that is not a run directory, a run directory in use by another run
    (``pipeline.run_lock``) and one made by a different experiment (``experiment_identity``, and rounds that
    disagree on a common prefix; adding rounds is the lifelong case and is fine) unless ``start_over``, which
    empties it first. Removes the temporaries of killed processes and writes ``config.json``."""
    with contextlib.ExitStack() as stack:
        error = None
        if distributed.current().is_main:
            try:
                _claim(config, start_over, stack)
            except Exception as e:
                error = e
        distributed.raise_if_failed_anywhere(error, f"claiming run directory {config.run_path}")
        yield


def _some(paths: list[Path], root: Path) -> str:
    return f"{', '.join(str(p.relative_to(root)) for p in paths[:5])}{' ...' if len(paths) > 5 else ''}"


def _claim(config: RunConfig, start_over: bool, stack: contextlib.ExitStack) -> None:
    path, saved_file = config.run_path, config.run_path / "config.json"
    problem = ownership_problem(path)
    if problem:
        raise LayerMoEError(f"{'--start-over deletes only run directories this project made: ' if start_over else ''}"
                            f"{problem}; choose another run_dir (or name=...)")
    path.mkdir(parents=True, exist_ok=True)
    stack.enter_context(run_lock(path))
    if start_over:
        _start_over(path)
    elif saved_file.exists():
        _check_same_experiment(config, saved_file)
    leftovers = remove_temporaries(path)
    if leftovers.removed:
        log.info(f"removed {len(leftovers.removed)} temporary file(s) left by an interrupted run: "
                 f"{_some(leftovers.removed, path)}")
    if leftovers.restored:
        log.info(f"put back {len(leftovers.restored)} output(s) that a killed run had moved aside to replace them: "
                 f"{_some(leftovers.restored, path)}")
    mark_run_dir(config)
    write_json(saved_file, to_dict(config))
