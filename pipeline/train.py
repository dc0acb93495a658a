"""Training stages 1 and 2 with DeepSpeed (docs/method.md, 2 and 3.3-3.5).

* stage 1: trainable = this round's new experts + routers; loss = CE + alpha * load balance; new languages.
  The routing classifiers do not act (``config.classifiers_active`` stays False, as upcycle left it).
* stage 2: the classifiers are switched on before the first step (and stay on in the exported model);
  trainable = routers + classifiers; loss = CE + gamma * LPR + beta * classifier CE; new + replay.
* dense baselines (``expansion: dense_full | dense_ffn | lora``, ``pipeline.dense_expansion``): the dense
  model's own parameters (or LoRA adapters) train in both stages on the same data and schedule, CE only.

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

import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.accelerator import choose_deepspeed_accelerator

choose_deepspeed_accelerator()  # before the first import of DeepSpeed

import deepspeed
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from safetensors import SafetensorError

from pipeline import distributed, log
from pipeline.base_model import load_causal_lm, pick_device, read_model_config
from pipeline.checkpoint_dir import StartPoint
from pipeline.config import RunConfig, StageTrainConfig, TrainingStage, result_settings
from pipeline.dense_expansion import merged_model, prepare_dense_model
from pipeline.distributed import DistInfo
from pipeline.ds_config import deepspeed_config, precision
from pipeline.errors import LayerMoEError
from pipeline.export import export_model
from pipeline.expert_parallel import (ExpertPlacement, expert_parallel_group, load_sharded_model,
                                      mark_expert_parameters, unshard_model)
from pipeline.hf_modeling.modeling_layermoe import LayerMoEForCausalLM, RoutingRecord, moe_blocks, output_logits
from pipeline.losses import HiddenStates, LossParts, stage_loss
from pipeline.memory import memory_in_use_gib, peak_memory_gib, return_freed_memory_to_the_os
from pipeline.ranks import LOOPBACK, discover_ranks, free_port, use_local_device
from pipeline.plots import expert_load_figure, pyplot
from pipeline.routing_stats import LayerRouting, RoutingStats
from pipeline.run_dir import stores_file
from pipeline.stop_signals import StopRequested, deferred_stop_requests
from pipeline.store_index import StoreIndex
from pipeline.training_checkpoint import (Layout, ResumePoint, SavedCheckpoint, complete_checkpoints, expert_shards,
                                          newest_complete_checkpoint, save_checkpoint)
from pipeline.training_data import StageMix, build_stage_mix, stage_languages
from pipeline.training_metrics import MetricsLog, Trackers, loss_weights, step_record, tracked_scalars
from pipeline.upcycle import parameter_roles, set_trainable


class TrainingDiverged(LayerMoEError):
    """The loss or the gradient norm became NaN or infinite."""


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


TRAINING_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # by DeepSpeed precision


@dataclass(frozen=True)
class TrainingSettings:
    """What decides a training stage's result besides the content of its inputs (the input model, and the data:
    the round's stores.json, which names every token store by the corpus, split and tokenizer it holds): its
    manifest's config slice, and with them its checkpoints' fingerprint (``pipeline/checkpoint_dir.py``). Run
    settings (``pipeline.config.run_setting``: logging, tracking, checkpoint cadence, ``ep_size``) are not part
    of it."""

    train: dict  # the result settings of ``train`` but the stages' schedules and the DeepSpeed config's path
    stage: dict  # this stage's schedule and data sizes
    ds_config: dict  # the DeepSpeed config's content (its path does not matter)
    seed: int
    trainable: list[str]  # parameter roles
    token_budgets: dict[str, int]  # the languages it reads, with the tokens of each
    original_languages: list[str]
    expansion: str  # moe, or a dense baseline


def training_settings(config: RunConfig, round_index: int, training_stage: TrainingStage) -> TrainingSettings:
    """The :class:`TrainingSettings` of a training stage of a round."""
    stage = config.train.for_stage(training_stage)
    _, budgets = stage_languages(config, round_index, training_stage)
    train = {k: v for k, v in result_settings(config.train).items() if k not in ("stage1", "stage2", "ds_config")}
    return TrainingSettings(train, result_settings(stage),
                            deepspeed_config(config.train.ds_config, stage, config.train.gradient_clipping),
                            config.seed, trainable_roles(training_stage, round_index + 1), budgets,
                            list(config.old_languages), config.expansion)


@dataclass(frozen=True)
class TrainingRun:
    """One training stage of one round: what it starts from, its settings, its layout, where checkpoints go."""

    config: RunConfig
    round_index: int
    training_stage: TrainingStage
    model_in: Path
    checkpoint_dir: Path
    layout: Layout
    started_from: SavedCheckpoint | None = None  # the checkpoint this run resumed from

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
    trained_parameters: dict[str, int]  # trainable parameters by role (e.g. experts_round1, routers; dense_full)
    memory_before_model_gib: float  # in use before the model was loaded (see ``pipeline.memory``)

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
    trained_parameters: dict[str, int]  # by role
    memory_before_model_gib: float  # in use when the stage started to load its model (the peak's baseline)
    peak_memory_growth_gib: float  # the largest peak above that baseline on any rank (what ``layermoe plan`` predicts)


def train_stage(config: RunConfig, round_index: int, training_stage: TrainingStage, model_in: Path,
                checkpoint_dir: Path, start_at: StartPoint, export_dir: Path | None) -> StageResult:
    """Run one training stage on every rank from ``start_at`` (``pipeline.checkpoint_dir.start_point``), saving
    checkpoints into ``checkpoint_dir``; rank 0 exports the trained model to ``export_dir``. A stop signal
    (SIGTERM, SIGUSR1) on any rank ends the run at the next step boundary with a checkpoint
    (:class:`~pipeline.stop_signals.StopRequested`)."""
    dist = distributed.current()
    run = TrainingRun(config, round_index, training_stage, model_in, checkpoint_dir, _layout(config, dist),
                      start_at.checkpoint)
    if start_at.checkpoint is not None and start_at.checkpoint.step > run.settings.steps:
        raise LayerMoEError(f"checkpoint {start_at.checkpoint.tag_dir} is at step {start_at.checkpoint.step}, beyond "
                            f"train.stage{training_stage}.steps={run.settings.steps}")
    resume = ResumePoint(start_at.checkpoint, start_at.same_settings, run.layout)
    trainer = build_engine(run, resume)
    start = resume.restore(trainer.engine, trainer.scheduler)
    log.info(f"{run.name}: {len(trainer.trainable)} trainable tensors "
             f"({sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad):,} parameters), "
             f"{len(trainer.data)} blocks, steps {start}..{run.settings.steps}, world {dist.world_size}, "
             f"ep_size {run.layout.ep_size}")
    reporter = _Reporter(run, start)
    losses: dict[str, float] = {}
    with deferred_stop_requests() as stop, contextlib.closing(reporter):
        for step in range(start, run.settings.steps):
            lr = trainer.scheduler.get_last_lr()[0]  # the rate this step uses (engine.step moves the schedule on)
            outcome = train_step(run, trainer, step, reporter.routing)
            losses = outcome.losses
            reporter.step_done(step, outcome, lr)
            periodic = _periodic_checkpoint_due(run, step + 1)
            if periodic:
                save_checkpoint(trainer.engine, checkpoint_dir, step + 1, run.layout)
            if stop.agreed():
                if not periodic:
                    save_checkpoint(trainer.engine, checkpoint_dir, step + 1, run.layout)
                raise StopRequested(f"{run.name}: stopped by {stop.describe()} after step {step + 1} of "
                                    f"{run.settings.steps}; checkpoint step{step + 1} saved")
    save_final_checkpoint_and_export(run, trainer, export_dir)
    memory = distributed.all_gather_objects((peak_memory_gib(trainer.device), trainer.memory_before_model_gib))
    kind = "GPU allocated" if trainer.device.type == "cuda" else "process RSS"
    log.info(f"{run.name} done: {reporter.tokens_per_second():,.0f} tok/s; peak memory ({kind}) by rank: "
             + ", ".join(f"{r}: {peak * 1024:.0f} MiB ({(peak - before) * 1024:.0f} MiB more than before the model "
                         f"was loaded)" for r, (peak, before) in enumerate(memory)))
    return StageResult(run.settings.steps, losses, reporter.tokens_per_second(), reporter.last_routing,
                       memory[dist.rank][0], trainer.trained_parameters, trainer.memory_before_model_gib,
                       max(peak - before for peak, before in memory))


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
    """Build the data (:func:`stage_data`); load the model in the precision DeepSpeed trains in (and, from a
    checkpoint of another layout, its weights), with expert parallelism only this rank's experts; choose what
    trains, group the optimizer's parameters, build the DeepSpeed engine. Every rank calls this."""
    config, settings = run.config, run.settings
    torch.manual_seed(config.seed)
    ds = deepspeed_config(config.train.ds_config, settings, config.train.gradient_clipping)
    data = stage_data(run)
    device = torch.device(pick_device(config.model.device))
    if device.type == "cpu":
        return_freed_memory_to_the_os()
        if precision(ds) == "bf16":
            log.warn(f"{config.train.ds_config}: bf16 on CPU is slow (it runs, and the tests check it, but "
                     f"ds_configs/cpu_fp32.json trains faster here)")
    before = memory_in_use_gib(device)
    dtype = TRAINING_DTYPES[precision(ds)]
    if config.expansion != "moe":
        model, by_role = prepare_dense_model(load_causal_lm(run.model_in, dtype, str(device)), config.expansion,
                                             config.train.lora)
        resume.load_checkpoint_weights(model)
        placements = {}
    else:
        model, placements = _load_model(run, dtype)
        if run.training_stage == 2:
            model.set_classifiers_active(True)  # the classifiers act from stage 2 on (docs/method.md, 3.3)
        resume.load_checkpoint_weights(model)
        roles = trainable_roles(run.training_stage, len(model.config.rounds))
        set_trainable(model, roles)
        by_role = {role: [name for name, _ in params] for role, params in parameter_roles(model).items() if role in roles}
    trainable = [name for names in by_role.values() for name in names]
    if not trainable:
        raise LayerMoEError(f"{run.name} has nothing to train in {run.model_in} (no new experts/routers/classifiers)")
    params = dict(model.named_parameters())
    trained_parameters = {role: sum(params[name].numel() for name in names) for role, names in by_role.items()}
    param_groups = _optimizer_param_groups(model, placements, run)
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(param_groups, lr=settings.lr, weight_decay=config.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, settings))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return Trainer(engine, scheduler, data, trainable, trained_parameters, before)


def stage_data(run: TrainingRun) -> StageMix:
    """The stage's blocks, from the train-split stores that the round's tokenize stage lists (``stores.json``),
    checked to be of the input model's tokenizer."""
    index = StoreIndex.read(stores_file(run.config, run.round_index), run.model_in)
    languages, _ = stage_languages(run.config, run.round_index, run.training_stage)
    return build_stage_mix(run.config, run.round_index, run.training_stage, index.open_all(languages, "train"))


def _load_model(run: TrainingRun, dtype: str) -> tuple[LayerMoEForCausalLM, dict[int, ExpertPlacement]]:
    """The stage's input model and the placement of each MoE layer's experts (none at ep_size 1). With expert
    parallelism each rank reads only the shared tensors and its own experts (``load_sharded_model``)."""
    if read_model_config(run.model_in)["model_type"] != "layermoe":
        raise LayerMoEError(f"{run.model_in} is a dense model; training needs the upcycled model (run upcycle first)")
    device = pick_device(run.config.model.device)
    if run.layout.ep_size == 1:
        return load_causal_lm(run.model_in, dtype, device), {}
    try:
        return load_sharded_model(run.model_in, getattr(torch, dtype), device, expert_parallel_group(run.layout.ep_size))
    except (ValueError, OSError, SafetensorError) as e:
        raise LayerMoEError(f"cannot load model from {str(run.model_in)!r}: {e}") from e


def enable_activation_checkpointing(model: LayerMoEForCausalLM) -> None:
    """Keep only each decoder layer's input in the forward and recompute the layer in the backward (HF's
    per-layer checkpointing, non-reentrant: the MoE blocks' routing records and, with expert parallelism, the
    all-to-alls are recomputed too, on every rank in the same order)."""
    model.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.base.disable_input_require_grads()  # only the reentrant variant needs inputs that require grad


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
        _check_finite(f"loss {parts.as_floats()}", parts.total.detach(), step, run)
        trainer.engine.backward(parts.total)
        boundary = trainer.engine.is_gradient_accumulation_boundary()
        if boundary:
            grad_norm = _gradient_norm(trainer.engine, run.layout)  # before the update (None: the optimizer keeps it)
        trainer.engine.step()
        if boundary:
            reported = trainer.engine.get_global_grad_norm()  # DeepSpeed's own (ZeRO, bf16 optimizers)
            grad_norm = float(reported) if reported is not None else grad_norm
            if grad_norm is not None:  # the same on every rank
                _check_finite(f"gradient norm {grad_norm}", torch.tensor(grad_norm, device=trainer.device), step, run)
        routing.add(records, original.reshape(-1))
        for name, value in vars(parts).items():
            if value is not None:
                sums[name] = sums.get(name, 0) + value.detach()
        tokens += input_ids.numel()
    micro_batches = settings.gradient_accumulation * dist.world_size
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
    """The forward of one micro-batch: the stage's loss parts and every MoE layer's routing record. With
    ``train.loss_chunk_tokens`` an expanded model returns its hidden states and the loss applies the LM head in
    chunks."""
    train, model = run.config.train, engine.module
    expanded = isinstance(model, LayerMoEForCausalLM)
    if train.loss_chunk_tokens and expanded:  # (the dense baselines compute their logits whole)
        hidden = engine(input_ids=input_ids, use_cache=False, hidden_states_only=True).last_hidden_state
        prediction = HiddenStates(hidden, functools.partial(output_logits, model), train.loss_chunk_tokens)
    else:
        prediction = engine(input_ids=input_ids, use_cache=False).logits
    records = {i: block.last_routing for i, block in moe_blocks(model).items()} if expanded else {}
    parts = stage_loss(run.training_stage, prediction, input_ids, records, original, train)
    return parts, records


def _batch_mean(sums: dict[str, torch.Tensor], micro_batches: int) -> dict[str, float]:
    """Each loss part averaged over the step's micro-batches on every rank (the loss of the global batch)."""
    names = list(sums)  # the same order on every rank
    if not names:
        return {}
    values = distributed.all_reduce_sum(torch.stack([sums[n] for n in names]).float()) / micro_batches
    return dict(zip(names, values.tolist()))


def _check_finite(what: str, value: torch.Tensor, step: int, run: TrainingRun) -> None:
    """Stop the run on every rank (:class:`TrainingDiverged`) when ``value`` is not finite on any rank."""
    flag = (~torch.isfinite(value)).float().reshape(-1)[:1]
    if float(distributed.all_reduce_sum(flag)) > 0:
        # checkpoint step<s> holds the weights step s+1 starts from: the ones from step <= this step led here
        candidates = [*complete_checkpoints(run.checkpoint_dir), *([run.started_from] if run.started_from else [])]
        good = next((c for c in candidates if c.step < step), None)
        raise TrainingDiverged(
            f"non-finite {what} at step {step + 1}; stopping, nothing exported. "
            + (f"The last good checkpoint is {good.tag_dir} (step {good.step}): to continue from it with other "
               f"settings (e.g. a lower learning rate), add --resume-from {good.tag_dir}" if good
               else "There is no checkpoint from before it: run again with other settings (e.g. a lower learning "
                    "rate) to start the stage over."))


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
        export_trained_model(trainer.engine.module, newest_complete_checkpoint(run.checkpoint_dir), export_dir,
                             run.model_in)
    distributed.barrier()


def export_trained_model(model: torch.nn.Module, checkpoint: SavedCheckpoint, export_dir: Path,
                         model_in: Path) -> None:
    """Save the trained model as an HF directory (rank 0); with expert parallelism, the experts other ranks
    hold come from the final checkpoint's shards; LoRA adapters are merged into the weights."""
    if checkpoint.layout.ep_size > 1:
        unshard_model(model, expert_shards(checkpoint)[0])
    model = merged_model(model).eval()
    export_model(model, export_dir, tokenizer_from=model_in)


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
