"""Training stages 1 and 2 with DeepSpeed (docs/method.md, 2 and 3.3-3.5).

* stage 1: trainable = this round's new experts + routers; loss = CE + alpha * load balance; new languages.
* stage 2: trainable = routers + classifiers; loss = CE + gamma * LPR + beta * classifier CE; new + replay.

The model is the previous stage's exported HF directory; the result is exported the same way. The data are the
round's token stores (``stores.json`` of its tokenize stage); each rank reads only its own micro-batches. DeepSpeed
checkpoints (weights, optimizer, scheduler, step, RNG) are written every ``checkpoint_every`` steps and at the
end into a work directory that survives interruptions, so a rerun continues where a run stopped and ends
with the weights an uninterrupted run would have.

:func:`train_stage` runs one stage as its phases: :func:`build_engine` (model, expert sharding, trainable
parameters, optimizer groups, DeepSpeed engine), resume (:class:`~pipeline.training_checkpoint.ResumePoint`),
one :func:`train_step` per optimizer step, checkpoints, export.
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from pipeline import distributed, log
from pipeline.base_model import load_causal_lm, pick_device
from pipeline.config import RunConfig, StageTrainConfig, TrainingStage, to_dict
from pipeline.distributed import DistInfo
from pipeline.ds_config import deepspeed_config
from pipeline.errors import LayerMoEError
from pipeline.export import export_model
from pipeline.expert_parallel import (ExpertPlacement, expert_parallel_group, mark_expert_parameters, shard_model,
                                      unshard_model)
from pipeline.hf_modeling.modeling_layermoe import LayerMoEForCausalLM, RoutingRecord, moe_blocks
from pipeline.losses import LossParts, stage_loss
from pipeline.ranks import LOOPBACK, discover_ranks, free_port, use_local_device
from pipeline.plots import expert_load_figure, pyplot
from pipeline.routing_stats import LayerRouting, RoutingStats
from pipeline.run_dir import stores_file
from pipeline.store_index import StoreIndex
from pipeline.training_checkpoint import (Layout, ResumePoint, SavedCheckpoint, expert_shards, latest_checkpoint,
                                          save_checkpoint)
from pipeline.training_data import StageMix, build_stage_mix, stage_languages
from pipeline.training_metrics import MetricsLog, Trackers, loss_weights, step_record, tracked_scalars
from pipeline.upcycle import set_trainable


class TrainingDiverged(LayerMoEError):
    """The loss became NaN or infinite."""


def trainable_roles(training_stage: TrainingStage, round_number: int) -> list[str]:
    """Parameter roles a stage trains (see ``pipeline.upcycle.parameter_roles``)."""
    return [f"experts_round{round_number}", "routers"] if training_stage == 1 else ["routers", "classifiers"]


def lr_multiplier(step: int, settings: StageTrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(settings.steps - settings.warmup_steps, 1)
    progress = min((step - settings.warmup_steps) / span, 1.0)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def init_deepspeed_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed, also for a plain single-process run."""
    ranks = discover_ranks()  # torchrun / deepspeed / mpirun / srun
    if ranks.launcher == "none":  # a plain single process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR=LOOPBACK, MASTER_PORT=str(free_port()))
    use_local_device(ranks)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def describe_settings(config: RunConfig, training_stage: TrainingStage) -> dict:
    """The config slice a training stage depends on (for its manifest)."""
    # ep_size: a layout choice, checkpoints move between layouts; tracking: a run setting (where metrics go)
    excluded = ("stage1", "stage2", "ep_size", "tracking")
    return {"train": {k: v for k, v in to_dict(config.train).items() if k not in excluded},
            "stage": to_dict(config.train.for_stage(training_stage)), "seed": config.seed}


@dataclass(frozen=True)
class TrainingRun:
    """One training stage of one round: what it starts from, its settings, its layout, where checkpoints go."""

    config: RunConfig
    round_index: int
    training_stage: TrainingStage
    model_in: Path
    checkpoint_dir: Path
    layout: Layout

    @property
    def settings(self) -> StageTrainConfig:
        return self.config.train.for_stage(self.training_stage)

    @property
    def name(self) -> str:
        return f"stage {self.training_stage}"


@dataclass
class Trainer:
    """What :func:`build_engine` makes: the DeepSpeed engine (its ``module`` is the model), the learning-rate
    schedule, the stage's data (read from the round's token stores), and the names of the trainable parameters."""

    engine: deepspeed.DeepSpeedEngine
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: StageMix
    trainable: list[str]

    @property
    def device(self) -> torch.device:
        return torch.device(self.engine.device)


@dataclass
class StepOutcome:
    """One optimizer step: each loss part over the global batch (every micro-batch on every rank), and the
    number of tokens in that batch."""

    losses: dict[str, float]
    tokens: int
    grad_norm: float | None  # before clipping; None when the optimizer does not report it


@dataclass
class StageResult:
    steps: int
    final_loss: dict[str, float]
    tokens_per_second: float
    routing: dict[int, LayerRouting]  # the last interval's statistics, by MoE layer
    peak_memory_gib: float


def train_stage(config: RunConfig, round_index: int, training_stage: TrainingStage, model_in: Path,
                checkpoint_dir: Path, export_dir: Path | None) -> StageResult:
    """Run one training stage on every rank, resuming from the newest checkpoint in ``checkpoint_dir`` if there
    is one; rank 0 exports the trained model to ``export_dir``."""
    dist = distributed.current()
    run = TrainingRun(config, round_index, training_stage, model_in, checkpoint_dir, _layout(config, dist))
    resume = ResumePoint(checkpoint_dir, run.layout)
    trainer = build_engine(run, resume)
    start = resume.restore(trainer.engine, trainer.scheduler)
    log.info(f"{run.name}: {len(trainer.trainable)} trainable tensors "
             f"({sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad):,} parameters), "
             f"{len(trainer.data)} blocks, steps {start}..{run.settings.steps}, world {dist.world_size}, "
             f"ep_size {run.layout.ep_size}")
    reporter = _Reporter(run, start)
    losses: dict[str, float] = {}
    try:
        for step in range(start, run.settings.steps):
            lr = trainer.scheduler.get_last_lr()[0]  # the rate this step uses (engine.step moves the schedule on)
            outcome = train_step(run, trainer, step, reporter.routing)
            losses = outcome.losses
            reporter.step_done(step, outcome, lr)
            if _periodic_checkpoint_due(run, step + 1):
                save_checkpoint(trainer.engine, checkpoint_dir, step + 1, run.layout)
    finally:
        reporter.close()
    save_final_checkpoint_and_export(run, trainer, export_dir)
    peak = peak_memory_gib(trainer.device)
    log.info(f"{run.name} done: {reporter.tokens_per_second():,.0f} tok/s, peak memory of rank {dist.rank} "
             f"{peak:.2f} GiB ({'GPU allocated' if trainer.device.type == 'cuda' else 'process RSS'})")
    return StageResult(run.settings.steps, losses, reporter.tokens_per_second(), reporter.last_routing, peak)


def _layout(config: RunConfig, dist: DistInfo) -> Layout:
    """This run's layout; ``train.ep_size`` must divide the number of processes."""
    if dist.world_size % config.train.ep_size:
        raise LayerMoEError(f"train.ep_size={config.train.ep_size} does not divide the number of processes "
                            f"({dist.world_size})")
    return Layout(config.train.ep_size, dist.world_size)


# ----------------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------------


def build_engine(run: TrainingRun, resume: ResumePoint) -> Trainer:
    """Load the model (and, from a checkpoint of another layout, its weights), shard the experts over the
    expert-parallel group, choose what trains, group the optimizer's parameters, build the data (:func:`stage_data`)
    and the DeepSpeed engine. Every rank calls this."""
    config, settings = run.config, run.settings
    torch.manual_seed(config.seed)
    model = load_causal_lm(run.model_in, "float32", pick_device(config.model.device))
    if not isinstance(model, LayerMoEForCausalLM):
        raise LayerMoEError(f"{run.model_in} is a dense model; training needs the upcycled model (run upcycle first)")
    resume.load_weights_before_sharding(model)
    placements = _shard_experts(model, run.layout.ep_size)
    trainable = set_trainable(model, trainable_roles(run.training_stage, len(model.config.rounds)))
    if not trainable:
        raise LayerMoEError(f"{run.name} has nothing to train in {run.model_in} (no new experts/routers/classifiers)")
    param_groups = _optimizer_param_groups(model, placements, run)
    model.train()
    data = stage_data(run)
    optimizer = torch.optim.AdamW(param_groups, lr=settings.lr, weight_decay=config.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, settings))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config.train.ds_config, settings, config.train.gradient_clipping))
    return Trainer(engine, scheduler, data, trainable)


def stage_data(run: TrainingRun) -> StageMix:
    """The stage's blocks, from the train-split stores that the round's tokenize stage lists (``stores.json``),
    checked to be of the input model's tokenizer."""
    index = StoreIndex.read(stores_file(run.config, run.round_index), run.model_in)
    languages, _ = stage_languages(run.config, run.round_index, run.training_stage)
    return build_stage_mix(run.config, run.round_index, run.training_stage, index.open_all(languages, "train"))


def _shard_experts(model: LayerMoEForCausalLM, ep_size: int) -> dict[int, ExpertPlacement]:
    """With expert parallelism, keep only this rank's experts; the placement of each MoE layer (none at ep_size 1)."""
    if ep_size == 1:
        return {}
    return shard_model(model, expert_parallel_group(ep_size))


def _optimizer_param_groups(model: LayerMoEForCausalLM, placements: dict[int, ExpertPlacement],
                            run: TrainingRun) -> list:
    """The trainable parameters, as DeepSpeed's optimizer needs them: one group, or with expert parallelism in
    stage 1 (which trains experts) split so that expert gradients are reduced over the expert-data-parallel
    groups. Stage 2 trains no experts: they are only run where they live."""
    params = [p for p in model.parameters() if p.requires_grad]
    ep_size = run.layout.ep_size
    if ep_size == 1:
        return params
    mark_expert_parameters(model, ep_size)
    if run.training_stage == 2:
        return params
    _check_every_rank_trains_an_expert(model, placements, ep_size)
    return split_params_into_different_moe_groups_for_optimizer({"params": params, "name": "dense"})


def _check_every_rank_trains_an_expert(model: LayerMoEForCausalLM, placements: dict[int, ExpertPlacement],
                                       ep_size: int) -> None:
    """DeepSpeed's optimizer needs trainable expert parameters on every rank of an expert-parallel group."""
    trained_round = len(model.config.rounds)
    rounds = model.config.expert_rounds
    counts = [sum(rounds[i][e] == trained_round for i, p in placements.items() for e in p.owned(rank))
              for rank in range(ep_size)]
    if min(counts) == 0:
        raise LayerMoEError(f"train.ep_size={ep_size}: this round adds {sum(counts)} new experts, fewer than the "
                            f"{ep_size} expert-parallel ranks; use train.ep_size <= {max(sum(counts), 1)}")


# ----------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------


def train_step(run: TrainingRun, trainer: Trainer, step: int, routing: RoutingStats) -> StepOutcome:
    """One optimizer step: forward and backward over this rank's micro-batches of ``step`` (DeepSpeed
    accumulates the gradients and updates at the last one); their routing goes into ``routing``. Stops the run
    (:class:`TrainingDiverged`) when a loss is not finite on any rank."""
    settings, dist = run.settings, distributed.current()
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for micro in range(settings.gradient_accumulation):
        batch = trainer.data.micro_batch(step, micro, settings.gradient_accumulation, dist.rank, dist.world_size,
                                         settings.micro_batch_size)  # only this rank's rows are read
        input_ids = batch.input_ids.to(trainer.device)
        original = trainer.data.original_mask(batch.language_ids).to(trainer.device)
        parts, records = _micro_batch_loss(run, trainer.engine, input_ids, original)
        _check_finite(parts, step, run.checkpoint_dir)
        trainer.engine.backward(parts.total)
        if micro == settings.gradient_accumulation - 1:
            grad_norm = _gradient_norm(trainer.engine, run.layout)  # at the boundary: before the update
        trainer.engine.step()
        routing.add(records, original.reshape(-1))
        for name, value in vars(parts).items():
            if value is not None:
                sums[name] = sums.get(name, 0) + value.detach()
        tokens += input_ids.numel()
    micro_batches = settings.gradient_accumulation * dist.world_size
    reported = trainer.engine.get_global_grad_norm()  # DeepSpeed's own (ZeRO, bf16 optimizers) after the update
    grad_norm = float(reported) if reported is not None else grad_norm
    return StepOutcome(_batch_mean(sums, micro_batches), tokens * dist.world_size, grad_norm)


def _gradient_norm(engine, layout: Layout) -> float | None:
    """The 2-norm of the step's whole gradient, from the gradients in place at the accumulation boundary (after
    DeepSpeed's reduction, before clipping), when the optimizer keeps no norm of its own (None then: DeepSpeed
    reports it after the update). Every expert's gradient lives on the world_size / ep_size ranks of its
    expert-data-parallel group; every other gradient is the same on every rank."""
    if hasattr(engine.optimizer, "_global_grad_norm"):
        return None
    squares = torch.zeros(2, dtype=torch.float64, device=engine.device)  # [shared, expert]
    for p in engine.module.parameters():
        if p.grad is not None:
            squares[0 if getattr(p, "allreduce", True) else 1] += p.grad.detach().double().pow(2).sum()
    expert = distributed.all_reduce_sum(squares[1:].clone()) * layout.ep_size / layout.world_size
    return float((squares[0] + expert[0]).sqrt())


def _micro_batch_loss(run: TrainingRun, engine, input_ids: torch.Tensor,
                      original: torch.Tensor) -> tuple[LossParts, dict[int, RoutingRecord]]:
    """The forward of one micro-batch: the stage's loss parts and every MoE layer's routing record."""
    logits = engine(input_ids=input_ids, use_cache=False).logits
    records = {i: block.last_routing for i, block in moe_blocks(engine.module).items()}
    train = run.config.train
    parts = stage_loss(run.training_stage, logits, input_ids, records, original, train.alpha, train.gamma, train.beta,
                       train.lpr_form)
    return parts, records


def _batch_mean(sums: dict[str, torch.Tensor], micro_batches: int) -> dict[str, float]:
    """Each loss part averaged over the step's micro-batches on every rank (the loss of the global batch)."""
    names = list(sums)  # the same order on every rank
    if not names:
        return {}
    values = distributed.all_reduce_sum(torch.stack([sums[n] for n in names]).float()) / micro_batches
    return dict(zip(names, values.tolist()))


def _check_finite(parts: LossParts, step: int, checkpoint_dir: Path) -> None:
    flag = (~torch.isfinite(parts.total.detach())).float().reshape(1)
    if float(distributed.all_reduce_sum(flag)) > 0:
        latest = (checkpoint_dir / "latest").read_text().strip() if (checkpoint_dir / "latest").exists() else None
        raise TrainingDiverged(
            f"non-finite loss at step {step + 1}: {parts.as_floats()}; stopping. "
            + (f"The last good checkpoint is {checkpoint_dir / latest} (resume continues from it)." if latest
               else "No checkpoint was written yet."))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and export
# ----------------------------------------------------------------------------------------------------------


def _periodic_checkpoint_due(run: TrainingRun, done_steps: int) -> bool:
    """Whether ``train.checkpoint_every`` asks for a checkpoint after ``done_steps`` (the last step always gets one)."""
    every = run.config.train.checkpoint_every
    return bool(every) and done_steps % every == 0 and done_steps < run.settings.steps


def save_final_checkpoint_and_export(run: TrainingRun, trainer: Trainer, export_dir: Path | None) -> None:
    """The final checkpoint (every rank writes its part), then rank 0 exports the whole model to ``export_dir``."""
    save_checkpoint(trainer.engine, run.checkpoint_dir, run.settings.steps, run.layout)
    distributed.barrier()
    if export_dir is not None and distributed.current().is_main:
        export_trained_model(trainer.engine.module, latest_checkpoint(run.checkpoint_dir), export_dir, run.model_in)
    distributed.barrier()


def export_trained_model(model: LayerMoEForCausalLM, checkpoint: SavedCheckpoint, export_dir: Path,
                         model_in: Path) -> None:
    """Save the trained model as an HF directory (rank 0); with expert parallelism, the experts other ranks
    hold come from the final checkpoint's shards."""
    if checkpoint.layout.ep_size > 1:
        unshard_model(model, expert_shards(checkpoint))
    model.eval()
    export_model(model, export_dir, tokenizer_from=model_in)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on ``device`` when it is a GPU, else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ----------------------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------------------


class _Reporter:
    """One log line per step (and a progress bar on a terminal), routing statistics at intervals, metrics.jsonl,
    TensorBoard / W&B (``pipeline/training_metrics.py``)."""

    def __init__(self, run: TrainingRun, start: int):
        self.run, self.start = run, start
        self.started, self.tokens = time.perf_counter(), 0
        self.routing = RoutingStats()
        self.last_routing: dict[int, LayerRouting] = {}
        main = distributed.current().is_main
        self.metrics = MetricsLog(run.checkpoint_dir, start, write=main)
        previous = self.metrics.previous or {}
        self.tokens_before, self.elapsed_before = previous.get("tokens", 0), previous.get("elapsed_s", 0.0)
        self.weights = loss_weights(run.config)
        self.trackers = Trackers(run.config, run.round_index, run.training_stage, start) if main else None
        self.bar = None
        if log.interactive() and main:
            from tqdm import tqdm  # only on a terminal

            self.bar = tqdm(total=run.settings.steps, initial=start, desc=run.name, leave=False)

    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)

    def step_done(self, step: int, outcome: StepOutcome, lr: float) -> None:
        self.tokens += outcome.tokens
        done, steps, values = step + 1, self.run.settings.steps, outcome.losses
        elapsed, rate = time.perf_counter() - self.started, self.tokens_per_second()
        eta = (steps - done) * elapsed / max(done - self.start, 1)
        due = done % self.run.config.train.stats_every == 0 or done == steps
        record = step_record(done, values, self.weights, lr, outcome.grad_norm, self.tokens_before + self.tokens, rate,
                             self.elapsed_before + elapsed, self.routing.overview() if due else None)
        terms = " ".join(f"{k} {v:.4f}" + (f" (x{self.weights[k]}={record[k + '_scaled']:.4f})" if k in self.weights
                                           else "") for k, v in values.items() if k != "total")
        norm = "" if outcome.grad_norm is None else f" | grad norm {outcome.grad_norm:.3f}"
        line = (f"{self.run.name} step {done}/{steps} | loss {values['total']:.4f} | {terms} | lr {lr:.2e}{norm} | "
                f"{rate:,.0f} tok/s | ETA {log.duration(eta)}")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.write(line)
        else:
            log.info(line)
        self.metrics.append(record)
        if self.trackers is not None:
            self.trackers.scalars(tracked_scalars(record), done)
        if due:
            self._report_routing(done)

    def _report_routing(self, step: int) -> None:
        log.info(f"{self.run.name} routing @ step {step}: {self.routing.one_line()}")
        self.last_routing = self.routing.summary()
        self.metrics.add_routing(step, self.last_routing)
        if self.trackers is not None and self.trackers.active and self.last_routing:
            figure = expert_load_figure(self.last_routing, f"{self.run.name}, steps up to {step}")
            self.trackers.figure("routing/expert_load", figure, step)
            pyplot().close(figure)
        self.routing = RoutingStats()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.trackers is not None:
            self.trackers.close()
