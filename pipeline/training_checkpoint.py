"""Training checkpoints that can be resumed with the same or a different parallel layout.

A checkpoint is one tag directory ``<checkpoint_dir>/step<N>/`` with

* DeepSpeed's files: model states (written by rank 0: every parameter that rank holds), optimizer states;
* with expert parallelism (``ep_size > 1``), ``experts_ep<r>.safetensors`` for every expert-parallel rank r:
  the new experts that rank holds. Rank 0's model states plus these files are the whole model;
* ``layout.json``: step, ep_size and world size.

``<checkpoint_dir>/latest`` names the newest complete tag (DeepSpeed writes it last). Resuming with the layout
a checkpoint was saved with restores everything through DeepSpeed (bit-identical continuation). With another
layout (e.g. saved at ep_size=2 on 2 ranks, resumed at ep_size=1 on one), the weights, the step, the
learning-rate schedule and the RNG are restored and the optimizer moments start over, because DeepSpeed's
optimizer partitions depend on the layout; a warning says so.
"""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pipeline import distributed, log
from pipeline.atomic import write_json
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
                         f"{str(error)[:200]}); delete {checkpoint.tag_dir.parent} to start the stage over")


def expert_file(tag_dir: Path, ep_rank: int) -> Path:
    return tag_dir / f"experts_ep{ep_rank}.safetensors"


def save_checkpoint(engine, checkpoint_dir: Path, step: int, layout: Layout) -> None:
    """Write checkpoint ``step<step>`` (every rank calls this)."""
    dist = distributed.current()
    tag_dir = checkpoint_dir / f"step{step}"
    if layout.ep_size > 1 and dist.rank < layout.ep_size:  # one copy of each expert shard
        tag_dir.mkdir(parents=True, exist_ok=True)
        save_file(owned_expert_state(engine.module), str(expert_file(tag_dir, dist.rank)))
    if dist.is_main:
        tag_dir.mkdir(parents=True, exist_ok=True)
        write_json(tag_dir / "layout.json", {"step": step, **asdict(layout)})
    engine.save_checkpoint(str(checkpoint_dir), tag=tag_dir.name, client_state={"torch_rng": torch.get_rng_state()})
    log.info(f"checkpoint {tag_dir.name} saved in {checkpoint_dir}")


@dataclass(frozen=True)
class SavedCheckpoint:
    tag_dir: Path
    step: int
    layout: Layout


def latest_checkpoint(checkpoint_dir: Path) -> SavedCheckpoint | None:
    """The checkpoint ``latest`` points to, or None when there is none."""
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        return None
    tag_dir = checkpoint_dir / latest.read_text().strip()
    try:
        meta = json.loads((tag_dir / "layout.json").read_text())
        return SavedCheckpoint(tag_dir, int(meta["step"]), Layout(int(meta["ep_size"]), int(meta["world_size"])))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LayerMoEError(f"checkpoint {tag_dir} is incomplete or corrupt (layout.json: {e}); delete "
                            f"{checkpoint_dir} to start the stage over") from None


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
    if missing or unexpected:
        raise LayerMoEError(f"checkpoint {checkpoint.tag_dir} does not match the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=False)
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


def resume_other_layout(scheduler, checkpoint: SavedCheckpoint, layout: Layout, rng_state: torch.Tensor) -> int:
    """After ``load_weights``: replay the learning-rate schedule up to the checkpoint's step and restore the RNG;
    returns the step to continue from."""
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": replaying the schedule only
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(checkpoint.step):
            scheduler.step()
    torch.set_rng_state(rng_state)
    log.warn(f"resumed from {checkpoint.tag_dir} at step {checkpoint.step} with another layout "
             f"({checkpoint.layout} -> {layout}): weights, schedule and RNG restored, optimizer moments start over")
    return checkpoint.step


class ResumePoint:
    """Where a training stage starts, and how it gets there: from step 0, or from the newest checkpoint, saved
    with this layout or another one. Used at the two moments resuming needs:

    * :meth:`load_other_layout_weights`, right after the model is loaded (whole, or with expert parallelism only
      this rank's experts): with another layout the checkpoint's weights go into it directly (DeepSpeed cannot
      read them into this layout);
    * :meth:`restore`, once the DeepSpeed engine exists: with the same layout DeepSpeed restores everything;
      with another, the learning-rate schedule is replayed and the RNG restored. Returns the step to continue from.
    """

    def __init__(self, checkpoint_dir: Path, layout: Layout):
        self.checkpoint = latest_checkpoint(checkpoint_dir)
        self.layout = layout
        self._saved_rng: torch.Tensor | None = None  # another layout: the RNG state read with the weights

    @property
    def other_layout(self) -> bool:
        """Whether the checkpoint was saved with another layout than this run's."""
        return self.checkpoint is not None and self.checkpoint.layout != self.layout

    def load_other_layout_weights(self, model: torch.nn.Module) -> None:
        """With another layout: the checkpoint's weights into the freshly loaded model (nothing to do otherwise)."""
        if self.other_layout:
            self._saved_rng = load_weights(model, self.checkpoint)

    def restore(self, engine, scheduler) -> int:
        """The rest of the state, once the engine exists; returns the step to continue from (0: no checkpoint)."""
        if self.checkpoint is None:
            return 0
        if not self.other_layout:
            return resume_same_layout(engine, self.checkpoint)
        if self._saved_rng is None:
            raise RuntimeError("ResumePoint.restore before load_other_layout_weights")
        return resume_other_layout(scheduler, self.checkpoint, self.layout, self._saved_rng)
