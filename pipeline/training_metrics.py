"""What a training stage records while it runs, besides its log lines: ``metrics.jsonl``, ``routing_stats.json``
and, when ``train.tracking`` asks for them, TensorBoard event files and a Weights & Biases run.

``metrics.jsonl`` has one JSON object per optimizer step, written (by rank 0) into the stage's checkpoint
directory as the step ends and copied into the stage directory when the stage is done. A resumed run first
drops the lines after the step it resumes from, so the file always has exactly one line per step::

    step                 optimizer steps done (1, 2, ...)
    total                the optimised loss of the global batch
    ce, balance, lpr, classifier            each loss part of this stage, unweighted
    balance_scaled, lpr_scaled, classifier_scaled   the same times its weight (alpha, gamma, beta)
    lr                   the learning rate of the step
    grad_norm            the gradient's 2-norm before clipping (null when DeepSpeed does not report it)
    tokens, tokens_per_second, elapsed_s    tokens trained so far, their rate, seconds so far (over resumes)
    routing              at statistics steps (train.stats_every): RoutingOverview of the interval

Tracking settings are run settings: they decide where metrics go, never what is trained.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline import log
from pipeline.atomic import write_json, write_text
from pipeline.config import RunConfig, TrainingStage, to_dict
from pipeline.errors import LayerMoEError
from pipeline.routing_stats import LayerRouting, RoutingOverview, routing_to_json

METRICS_FILE = "metrics.jsonl"
ROUTING_FILE = "routing_stats.json"
LOSS_WEIGHTS = {"balance": "alpha", "lpr": "gamma", "classifier": "beta"}  # loss part -> its weight in train.*


def loss_weights(config: RunConfig) -> dict[str, float]:
    """The weight of each auxiliary loss part (the cross-entropy has none)."""
    return {part: getattr(config.train, weight) for part, weight in LOSS_WEIGHTS.items()}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in step order (a line cut off by a killed run is ignored)."""
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):  # only the last line may be cut off
                raise LayerMoEError(f"{path}: line {number} is not valid JSON") from None
    return records


class MetricsLog:
    """``metrics.jsonl`` and ``routing_stats.json`` of a stage in its checkpoint directory (rank 0 writes them)."""

    def __init__(self, work_dir: Path, start: int, write: bool):
        self.metrics_path, self.routing_path = work_dir / METRICS_FILE, work_dir / ROUTING_FILE
        self.write = write
        kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= start] if self.metrics_path.exists() else []
        self.previous = kept[-1] if kept else None  # where a resumed run's tokens and elapsed time continue from
        history = json.loads(self.routing_path.read_text()) if self.routing_path.exists() else []
        self.routing_history = [entry for entry in history if entry["step"] <= start]
        if write:
            write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            write_json(self.routing_path, self.routing_history)

    def append(self, record: dict[str, Any]) -> None:
        if self.write:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def add_routing(self, step: int, layers: dict[int, LayerRouting]) -> None:
        self.routing_history.append({"step": step, "layers": routing_to_json(layers)})
        if self.write:
            write_json(self.routing_path, self.routing_history)


def step_record(step: int, losses: dict[str, float], weights: dict[str, float], lr: float, grad_norm: float | None,
                tokens: int, tokens_per_second: float, elapsed_s: float,
                routing: RoutingOverview | None = None) -> dict[str, Any]:
    """One line of metrics.jsonl (see the module docstring)."""
    record: dict[str, Any] = {"step": step, "total": losses["total"]}
    for name, value in losses.items():
        if name != "total":
            record[name] = value
            if name in weights:
                record[f"{name}_scaled"] = weights[name] * value
    record.update(lr=lr, grad_norm=grad_norm, tokens=tokens, tokens_per_second=tokens_per_second, elapsed_s=elapsed_s)
    if routing is not None:
        record["routing"] = dataclasses.asdict(routing)
    return record


class Trackers:
    """The TensorBoard writer and W&B run of one training stage, as ``train.tracking`` asks (rank 0 only).

    TensorBoard: ``<run_dir>/logs/tensorboard/<round>-stage<N>/`` (a resumed run drops the events after its
    start step). W&B: one run per invocation, grouped by ``<run>/<round>``, files under ``<run_dir>/logs/wandb``."""

    def __init__(self, config: RunConfig, round_index: int, training_stage: TrainingStage, start: int):
        tracking, round_name = config.train.tracking, config.rounds[round_index].name
        logs = config.run_path / "logs"
        self.tensorboard = self.wandb = None
        if tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # the tensorboard package (checked by config validation)

            directory = logs / "tensorboard" / f"{round_name}-stage{training_stage}"
            self.tensorboard = SummaryWriter(str(directory), purge_step=start + 1 if start else None)
            log.info(f"TensorBoard: tensorboard --logdir {logs / 'tensorboard'}")
        if tracking.wandb:
            import wandb

            logs.mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=tracking.wandb_project or config.name, mode=tracking.wandb_mode,
                                    dir=str(logs), group=f"{config.name}/{round_name}",  # W&B adds wandb/
                                    name=f"{round_name}/stage{training_stage}", job_type=f"train_stage{training_stage}",
                                    config=to_dict(config))

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        present = {k: v for k, v in values.items() if v is not None}
        if self.tensorboard is not None:
            for tag, value in present.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(present, step=step)

    def figure(self, tag: str, fig, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_figure(tag, fig, step, close=False)
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(fig)}, step=step)

    @property
    def active(self) -> bool:
        return self.tensorboard is not None or self.wandb is not None

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def tracked_scalars(record: dict[str, Any]) -> dict[str, float | None]:
    """A metrics.jsonl record as TensorBoard / W&B scalars: ``loss/<part>``, ``train/<value>``, ``routing/<value>``."""
    values: dict[str, float | None] = {}
    for key, value in record.items():
        if key == "routing":
            values.update({f"routing/{k}": v for k, v in value.items()})
        elif key != "step":
            group = "train" if key in ("lr", "grad_norm", "tokens", "tokens_per_second", "elapsed_s") else "loss"
            values[f"{group}/{key}"] = value
    return values
