"""Training checkpoints that can be resumed with the same or a different parallel layout.

A checkpoint is one tag directory ``<checkpoint_dir>/step<N>/`` with

* DeepSpeed's files: model states (written by rank 0: every parameter that rank holds), optimizer states;
* with expert parallelism (``ep_size > 1``), ``experts_ep<r>.safetensors`` for every expert-parallel rank r:
  the new experts that rank holds. Rank 0's model states plus these files are the whole model;
* ``layout.json``: step, ep_size, world size and every file of the checkpoint with its size, written by rank 0
  last, once every rank has written its part.

A checkpoint is *complete* when its layout.json is readable and every file it lists (and every expert shard)
is there with its size; resuming uses the newest complete one, whatever DeepSpeed's ``latest`` says (a run
killed while saving leaves an incomplete newest tag). Resuming a checkpoint of the same settings with the
layout it was saved with restores everything through DeepSpeed (bit-identical continuation). With another
layout (e.g. saved at ep_size=2 on 2 ranks, resumed at ep_size=1 on one), or from a checkpoint of other
settings (``--resume-from``), the weights, the step and the RNG are restored, the learning-rate schedule is
this run's at that step, and the optimizer moments start over (DeepSpeed's optimizer partitions depend on
the layout; another run's moments and hyper-parameters are not this run's); a warning says so.

Which checkpoints belong to a stage run (its fingerprint) is ``pipeline/checkpoint_dir.py``.
"""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pipeline import distributed, log
from pipeline.atomic import cannot_write, write_json
from pipeline.errors import LayerMoEError
from pipeline.expert_parallel import RemoteExpert, owned_expert_state

MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class Layout:
    """How a training run is spread over processes."""

    ep_size: int
    world_size: int


UNREADABLE = (OSError, RuntimeError, KeyError, EOFError, TypeError, ValueError, pickle.UnpicklingError, SafetensorError)


def unreadable(checkpoint: SavedCheckpoint, error: Exception) -> LayerMoEError:
    return LayerMoEError(f"cannot read checkpoint {checkpoint.tag_dir} (corrupt? {type(error).__name__}: "
                         f"{str(error)[:200]}); move {checkpoint.tag_dir.parent} aside to start the stage over")


def expert_file(tag_dir: Path, ep_rank: int) -> Path:
    return tag_dir / f"experts_ep{ep_rank}.safetensors"


def save_checkpoint(engine, checkpoint_dir: Path, step: int, layout: Layout) -> None:
    """Write checkpoint ``step<step>`` (every rank calls this); its layout.json, written last, completes it. A
    failed write (a full disk) is an error naming the checkpoint; the checkpoint stays incomplete."""
    dist = distributed.current()
    tag_dir = checkpoint_dir / f"step{step}"
    try:
        if layout.ep_size > 1 and dist.rank < layout.ep_size:  # one copy of each expert shard
            tag_dir.mkdir(parents=True, exist_ok=True)
            save_file(owned_expert_state(engine.module), str(expert_file(tag_dir, dist.rank)))
        engine.save_checkpoint(str(checkpoint_dir), tag=tag_dir.name, client_state={"torch_rng": torch.get_rng_state()})
        distributed.barrier()
        if dist.is_main:
            files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != LAYOUT}
            write_json(tag_dir / LAYOUT, {"step": step, **asdict(layout), "files": files})
    except (OSError, RuntimeError, SafetensorError) as e:
        raise cannot_write(tag_dir, e) from None
    log.info(f"checkpoint {tag_dir.name} saved in {checkpoint_dir}")


@dataclass(frozen=True)
class SavedCheckpoint:
    tag_dir: Path
    step: int
    layout: Layout


LAYOUT = "layout.json"
TAG_PREFIX = "step"


class IncompleteCheckpoint(LayerMoEError):
    """A checkpoint without a readable layout.json: a run stopped while saving it."""


def read_checkpoint(tag_dir: Path) -> SavedCheckpoint:
    """The complete checkpoint in ``tag_dir``. Without a readable layout.json it is incomplete
    (:class:`IncompleteCheckpoint`); a file it lists that is missing or of another size means it is corrupt (a
    ``LayerMoEError`` naming the file)."""
    try:
        meta = json.loads((tag_dir / LAYOUT).read_text())
        checkpoint = SavedCheckpoint(tag_dir, int(meta["step"]), Layout(int(meta["ep_size"]), int(meta["world_size"])))
        files = dict(meta.get("files", {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IncompleteCheckpoint(f"checkpoint {tag_dir} is incomplete or not a checkpoint ({LAYOUT}: "
                                   f"{type(e).__name__}: {e})") from None
    required = {MODEL_STATES: None, **{expert_file(tag_dir, r).name: None
                                      for r in range(checkpoint.layout.ep_size if checkpoint.layout.ep_size > 1 else 0)}}
    for name, size in {**required, **files}.items():
        path = tag_dir / name
        if not path.is_file():
            problem = f"{name} is missing"
        elif size is not None and path.stat().st_size != size:
            problem = f"{name} has {path.stat().st_size} bytes, {size} when it was saved"
        else:
            continue
        raise LayerMoEError(f"cannot read checkpoint {tag_dir} (corrupt? {problem}); move {tag_dir.parent} aside to "
                            f"start the stage over, or start from an older checkpoint with --resume-from")
    return checkpoint


def complete_checkpoints(checkpoint_dir: Path) -> Iterator[SavedCheckpoint]:
    """The complete checkpoints in ``checkpoint_dir``, newest (highest step) first; incomplete ones are skipped,
    a corrupt one is an error."""
    for tag_dir in checkpoint_tags(checkpoint_dir):
        try:
            yield read_checkpoint(tag_dir)
        except IncompleteCheckpoint:
            continue


def _tag_step(path: Path) -> int | None:
    digits = path.name[len(TAG_PREFIX):]
    return int(digits) if path.name.startswith(TAG_PREFIX) and digits.isdigit() and path.is_dir() else None


def checkpoint_tags(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint tag directories in ``checkpoint_dir``, newest (highest step) first."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted((p for p in checkpoint_dir.iterdir() if _tag_step(p) is not None), key=_tag_step, reverse=True)


def newest_complete_checkpoint(checkpoint_dir: Path) -> SavedCheckpoint | None:
    """The complete checkpoint with the highest step in ``checkpoint_dir`` (None when there is none)."""
    return next(complete_checkpoints(checkpoint_dir), None)


def expert_shards(checkpoint: SavedCheckpoint, wanted: set[str] | None = None) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The experts of an expert-parallel checkpoint (every rank's, or only those named in ``wanted``) by state-dict
    name, and the names of all its experts (both empty for ep_size 1)."""
    shards: dict[str, torch.Tensor] = {}
    names: set[str] = set()
    for r in range(checkpoint.layout.ep_size if checkpoint.layout.ep_size > 1 else 0):
        with safe_open(str(expert_file(checkpoint.tag_dir, r)), framework="pt") as f:
            names.update(f.keys())
            shards.update({name: f.get_tensor(name) for name in f.keys() if wanted is None or name in wanted})
    return shards, names


def _held_by_another_rank(model: torch.nn.Module, name: str) -> bool:
    """Whether parameter ``name`` belongs to an expert that this (sharded) model holds as a ``RemoteExpert``."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        try:
            return isinstance(model.get_submodule(".".join(parts[:end])), RemoteExpert)
        except AttributeError:
            continue
    return False


def load_weights(model: torch.nn.Module, checkpoint: SavedCheckpoint) -> torch.Tensor:
    """Load a checkpoint's weights (rank 0's model states plus the expert shards) into the model before DeepSpeed:
    a whole model, or one sharded by ``load_sharded_model`` (then only the experts it holds are read); returns the
    saved RNG state."""
    own = model.state_dict()
    try:  # mmap: tensors this model does not hold are never read
        saved = torch.load(checkpoint.tag_dir / MODEL_STATES, map_location="cpu", weights_only=False, mmap=True)
        state, names = expert_shards(checkpoint, wanted=set(own))
        state.update({k: v for k, v in saved["module"].items() if k in own})
        names |= set(saved["module"])
    except UNREADABLE as e:
        raise unreadable(checkpoint, e) from None
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in names - set(own) if not _held_by_another_rank(model, k))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise LayerMoEError(f"checkpoint {checkpoint.tag_dir} is of another model architecture or allocation than "
                            f"this stage's input model: not in the checkpoint {missing[:3]}, not in the model "
                            f"{unexpected[:3]}, other shapes {shapes[:3]}")
    model.load_state_dict(state, strict=False)  # a sharded model holds only its own experts
    return saved["torch_rng"]


def resume_same_layout(engine, checkpoint: SavedCheckpoint) -> int:
    """Restore everything DeepSpeed saved (weights, optimizer, scheduler) plus this rank's expert shard and the
    RNG; returns the step to continue from."""
    try:
        path, client = engine.load_checkpoint(str(checkpoint.tag_dir.parent), tag=checkpoint.tag_dir.name,
                                              load_module_strict=checkpoint.layout.ep_size == 1)
        if path is None:
            raise OSError("DeepSpeed found no checkpoint there")
        if checkpoint.layout.ep_size > 1:  # rank 0's model states do not hold this rank's experts
            ep_rank = distributed.current().rank % checkpoint.layout.ep_size
            shard = load_file(str(expert_file(checkpoint.tag_dir, ep_rank)))
            params = dict(engine.module.named_parameters())
            with torch.no_grad():
                for name, value in shard.items():
                    params[name].copy_(value)
    except UNREADABLE as e:
        raise unreadable(checkpoint, e) from None
    torch.set_rng_state(client["torch_rng"])
    log.info(f"resumed from {path} at step {checkpoint.step}")
    return checkpoint.step


def resume_weights_only(scheduler, checkpoint: SavedCheckpoint, why: str, rng_state: torch.Tensor) -> int:
    """After ``load_weights``: replay this run's learning-rate schedule up to the checkpoint's step and restore the
    RNG; returns the step to continue from. ``why``: the reason nothing else is restored, for the warning."""
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": replaying the schedule only
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(checkpoint.step):
            scheduler.step()
    torch.set_rng_state(rng_state)
    log.warn(f"resumed from {checkpoint.tag_dir} at step {checkpoint.step} {why}: weights, step and RNG restored, "
             f"this run's learning-rate schedule, optimizer moments start over")
    return checkpoint.step


class ResumePoint:
    """Where a training stage starts, and how it gets there: from step 0, or from a checkpoint, restored whole
    (same settings, same layout) or by its weights (another layout, or other settings: ``--resume-from``). Used
    at the two moments resuming needs:

    * :meth:`load_checkpoint_weights`, right after the model is loaded (whole, or with expert parallelism only
      this rank's experts): when not restored whole (another layout, or ``--resume-from`` with other settings),
      the checkpoint's weights go into it directly (DeepSpeed cannot read them into another layout);
    * :meth:`restore`, once the DeepSpeed engine exists: restored whole, DeepSpeed restores everything; else the
      learning-rate schedule is replayed and the RNG restored. Returns the step to continue from.
    """

    def __init__(self, checkpoint: SavedCheckpoint | None, same_settings: bool, layout: Layout):
        self.checkpoint = checkpoint
        self.same_settings = same_settings
        self.layout = layout
        self._saved_rng: torch.Tensor | None = None  # weights only: the RNG state read with the weights

    @property
    def whole(self) -> bool:
        """Whether the checkpoint is restored whole (the same settings and layout as this run)."""
        return self.checkpoint is not None and self.same_settings and self.checkpoint.layout == self.layout

    def load_checkpoint_weights(self, model: torch.nn.Module) -> None:
        """Weights only: the checkpoint's weights into the freshly loaded model (nothing to do otherwise)."""
        if self.checkpoint is not None and not self.whole:
            self._saved_rng = load_weights(model, self.checkpoint)

    def restore(self, engine, scheduler) -> int:
        """The rest of the state, once the engine exists; returns the step to continue from (0: no checkpoint)."""
        if self.checkpoint is None:
            return 0
        if self.whole:
            return resume_same_layout(engine, self.checkpoint)
        if self._saved_rng is None:
            raise RuntimeError("ResumePoint.restore before load_checkpoint_weights")
        why = ("with another layout" if self.same_settings else "saved with other settings (--resume-from)") + \
              (f" ({self.checkpoint.layout} -> {self.layout})" if self.checkpoint.layout != self.layout else "")
        return resume_weights_only(scheduler, self.checkpoint, why, self._saved_rng)
