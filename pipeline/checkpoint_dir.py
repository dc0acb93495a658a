"""A training stage's checkpoint directory, bound to what produced it.

``<round>/train_stageN.checkpoints/fingerprint.json`` records the stage's fingerprint (``pipeline/manifest.py``:
its result settings, input model, corpora and code version; not its run settings such as logging, checkpoint
cadence or ``ep_size``), the config slice and input hashes (to say what changed), and where a run started with
``--resume-from`` started. When a training stage starts (on the main rank, with the run lock held):

* the same fingerprint: the checkpoints are this run's; training resumes from the newest complete one;
* another fingerprint, or none (a directory of an older version): the directory is moved aside to
  ``<name>.stale-<UTC time>`` (the log says what changed) and the stage starts over. Stale directories are never
  resumed from and never deleted: resuming one is an explicit choice, ``--resume-from``;
* ``--resume-from CHECKPOINT`` (a ``stepN`` directory): the current directory, if any, is moved aside, and the
  stage starts from that checkpoint. A rerun of the same command (a requeued job) continues from the newest
  checkpoint it has saved since, or from that checkpoint again;
* an unreadable fingerprint.json is an error naming it; nothing is moved.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline import log
from pipeline.atomic import read_json_object, write_json
from pipeline.errors import LayerMoEError
from pipeline.manifest import describe_changes
from pipeline.training_checkpoint import (IncompleteCheckpoint, SavedCheckpoint, checkpoint_tags,
                                          newest_complete_checkpoint, read_checkpoint)

FINGERPRINT = "fingerprint.json"
FORMAT = 1
SUFFIX = ".checkpoints"  # <stage directory name>.checkpoints


@dataclass(frozen=True)
class StageIdentity:
    """What produced a stage's checkpoints: its label (``g1/train_stage1``), fingerprint, config slice (plain
    data) and input hashes."""

    stage: str
    fingerprint: str
    config: dict[str, Any]
    inputs: dict[str, str]


@dataclass(frozen=True)
class ResumedFrom:
    """Where a run started with ``--resume-from`` started: the path given, where that checkpoint is now, its step,
    and whether it was saved with this run's settings (then it is restored whole)."""

    requested: str
    checkpoint: str
    step: int
    same_settings: bool


@dataclass(frozen=True)
class Recorded:
    """A checkpoint directory's fingerprint.json (``fingerprint`` None: written by an older version)."""

    stage: str | None
    fingerprint: str | None
    config: Any
    inputs: dict[str, str]
    resumed_from: ResumedFrom | None


@dataclass(frozen=True)
class StartPoint:
    """Where a training stage starts: a checkpoint (None: step 0), and whether it has this run's settings."""

    checkpoint: SavedCheckpoint | None
    same_settings: bool


def read_fingerprint(directory: Path) -> Recorded | None:
    """``directory``'s fingerprint.json (None when there is none); an unreadable one is an error naming it."""
    path = directory / FINGERPRINT
    if not path.exists():
        return None
    hint = (f"; move {directory} aside to start the stage over, or start from one of its checkpoints with "
            f"--resume-from {directory}/stepN")
    doc = read_json_object(path, "checkpoint fingerprint", fix=hint)
    if "fingerprint" not in doc:  # an older version stored the settings alone
        return Recorded(None, None, doc, {}, None)
    try:
        resumed = doc.get("resumed_from")
        recorded = Recorded(doc.get("stage"), doc["fingerprint"], doc["config"], dict(doc["inputs"]),
                            ResumedFrom(**resumed) if resumed is not None else None)
        if not isinstance(recorded.fingerprint, str):
            raise TypeError("the fingerprint is not a string")
    except (KeyError, TypeError, ValueError) as e:
        raise LayerMoEError(f"checkpoint fingerprint {path} is not one this project writes ({type(e).__name__}: "
                            f"{e}){hint}") from None
    return recorded


def checkpoint_stage(tag_dir: Path) -> str | None:
    """The stage (``g1/train_stage1``) a checkpoint belongs to: from its directory's fingerprint.json, else from
    its path (``<round>/<stage>.checkpoints[.stale-...]/stepN``); None when neither tells."""
    try:
        doc = json.loads((tag_dir.parent / FINGERPRINT).read_text())
        if isinstance(doc, dict) and isinstance(doc.get("stage"), str):
            return doc["stage"]
    except (OSError, ValueError):
        pass
    name = tag_dir.parent.name
    return f"{tag_dir.parent.parent.name}/{name.split(SUFFIX)[0]}" if SUFFIX in name else None


def _move_aside(directory: Path, reason: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    stale = directory.with_name(f"{directory.name}.stale-{stamp}")
    n = 1
    while stale.exists():
        n += 1
        stale = directory.with_name(f"{directory.name}.stale-{stamp}-{n}")
    directory.rename(stale)
    log.warn(f"{directory.name}: not resuming these checkpoints ({reason}); moved them aside to {stale} and "
             f"starting over")
    return stale


def _drop_incomplete_tags(directory: Path) -> None:
    """Remove the incomplete checkpoints newer than the newest complete one (a run stopped while saving them)."""
    for tag_dir in checkpoint_tags(directory):
        try:
            read_checkpoint(tag_dir)
            return
        except IncompleteCheckpoint:
            log.warn(f"{tag_dir}: incomplete checkpoint (a run stopped while saving it); removing it")
            shutil.rmtree(tag_dir)


def _resume_source(requested: Path, identity: StageIdentity) -> tuple[SavedCheckpoint, bool]:
    """The checkpoint ``--resume-from`` names, checked, and whether it has this run's settings."""
    checkpoint = read_checkpoint(requested)
    owner = checkpoint_stage(requested)
    if owner is not None and owner.split("/")[-1] != identity.stage.split("/")[-1]:
        raise LayerMoEError(f"--resume-from {requested}: a checkpoint of {owner}, not of {identity.stage}")
    try:
        source = read_fingerprint(requested.parent)
    except LayerMoEError:
        source = None
    return checkpoint, source is not None and source.fingerprint == identity.fingerprint


def prepare_checkpoint_dir(directory: Path, identity: StageIdentity, resume_from: Path | None) -> None:
    """Make ``directory`` hold only checkpoints of ``identity`` (see the module docstring). Main rank only, with
    the run lock held."""
    recorded = read_fingerprint(directory)
    requested = str(resume_from.resolve()) if resume_from is not None else None
    if recorded is not None and recorded.fingerprint == identity.fingerprint and (
            requested is None or (recorded.resumed_from is not None and recorded.resumed_from.requested == requested)):
        _drop_incomplete_tags(directory)
        return
    resumed = None
    if requested is not None:
        source = Path(requested)
        if not source.exists() and recorded is not None and recorded.resumed_from is not None \
                and recorded.resumed_from.requested == requested:  # moved aside when this directory's run started
            source = Path(recorded.resumed_from.checkpoint)
        checkpoint, same_settings = _resume_source(source, identity)
        reason = f"starting from --resume-from {requested}"
    elif recorded is None:
        reason = f"they have no {FINGERPRINT} (made by an older version)"
    else:
        reason = "the stage's settings or inputs changed: " + describe_changes(recorded.config, recorded.inputs,
                                                                            identity.config, identity.inputs)
    if directory.exists():
        stale = _move_aside(directory, reason)
        if requested is not None and checkpoint.tag_dir.resolve().is_relative_to(directory.resolve()):
            checkpoint = read_checkpoint(stale.resolve() / checkpoint.tag_dir.resolve().relative_to(directory.resolve()))
    if requested is not None:
        resumed = ResumedFrom(requested, str(checkpoint.tag_dir), checkpoint.step, same_settings)
        log.info(f"{identity.stage}: starting from checkpoint {checkpoint.tag_dir} (step {checkpoint.step}, "
                 f"{'the same' if same_settings else 'other'} settings)")
    directory.mkdir(parents=True)
    write_json(directory / FINGERPRINT, {"format": FORMAT, "stage": identity.stage, "fingerprint": identity.fingerprint,
                                         "config": identity.config, "inputs": identity.inputs,
                                         "resumed_from": asdict(resumed) if resumed else None})


def start_point(directory: Path) -> StartPoint:
    """Where training starts, once :func:`prepare_checkpoint_dir` has run (every rank): the newest complete
    checkpoint of this directory, else the ``--resume-from`` checkpoint it started from, else step 0."""
    own = newest_complete_checkpoint(directory)
    if own is not None:
        return StartPoint(own, True)
    recorded = read_fingerprint(directory)
    if recorded is not None and recorded.resumed_from is not None:
        return StartPoint(read_checkpoint(Path(recorded.resumed_from.checkpoint)), recorded.resumed_from.same_settings)
    return StartPoint(None, True)


def resumed_from_request(directory: Path) -> str | None:
    """The ``--resume-from`` path a checkpoint directory's run was started with (None: none, or unreadable)."""
    try:
        recorded = read_fingerprint(directory)
    except LayerMoEError:
        return None
    return recorded.resumed_from.requested if recorded and recorded.resumed_from else None
