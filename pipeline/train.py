"""Training stages 1 and 2 with DeepSpeed (PAPER.md 2, 3.3-3.5).

* stage 1: trainable = this round's new experts + routers; loss = CE + alpha * load balance; new languages.
* stage 2: trainable = routers + classifiers; loss = CE + gamma * LPR + beta * classifier CE; new + replay.

The model is the previous stage's exported HF directory; the result is exported the same way. DeepSpeed
checkpoints (weights, optimizer, scheduler, step, RNG) are written every ``checkpoint_every`` steps and at the
end into a work directory that survives interruptions, so ``resume`` continues where a run stopped and ends
with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import distributed, log
from pipeline.atomic import read_json, write_json
from pipeline.base_model import load_causal_lm, pick_device
from pipeline.config import RunConfig, StageTrainConfig, to_dict
from pipeline.errors import LayerMoEError
from pipeline.expert_parallel import expert_parallel_group, mark_expert_parameters, shard_model, unshard_model
from pipeline.hf_modeling.modeling_layermoe import LayerMoEForCausalLM, moe_blocks
from pipeline.losses import stage_loss
from pipeline.packing import load_tokenizer
from pipeline.routing_stats import RoutingStats
from pipeline.training_checkpoint import (Layout, expert_shards, latest_checkpoint, load_weights, resume_other_layout,
                                         resume_same_layout, save_checkpoint)
from pipeline.training_data import build_stage_data, micro_batch_indices
from pipeline.upcycle import set_trainable


class TrainingDiverged(LayerMoEError):
    """The loss became NaN or infinite."""


def trainable_roles(stage: int, round_number: int) -> list[str]:
    """Parameter roles a stage trains (see ``pipeline.upcycle.parameter_roles``)."""
    return [f"experts_round{round_number}", "routers"] if stage == 1 else ["routers", "classifiers"]


def lr_multiplier(step: int, settings: StageTrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(settings.steps - settings.warmup_steps, 1)
    progress = min((step - settings.warmup_steps) / span, 1.0)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(path: str, settings: StageTrainConfig, clipping: float) -> dict:
    """A DeepSpeed config from ``ds_configs/``, with the "auto" entries filled from our config."""
    file = Path(path)
    bundled = Path(__file__).resolve().parents[1] / path  # ds_configs/ of this project, wherever we run from
    if not file.is_file() and not file.is_absolute() and bundled.is_file():
        file = bundled
    ds = read_json(file, "train.ds_config: DeepSpeed config")
    fill = {"train_micro_batch_size_per_gpu": settings.micro_batch_size,
            "gradient_accumulation_steps": settings.gradient_accumulation, "gradient_clipping": clipping}
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("train_batch_size", None)
    if not torch.cuda.is_available() and ds.get("bf16", {}).get("enabled"):
        log.warn(f"{path}: bf16 on CPU is slow and not what the tests cover; consider ds_configs/cpu_fp32.json")
    return ds


def init_deepspeed_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed, also for a plain single-process run."""
    import deepspeed

    from pipeline.launch import LOOPBACK, discover_ranks, free_port, use_local_device

    ranks = discover_ranks()  # torchrun / deepspeed / mpirun / srun
    if ranks.launcher == "none":  # a plain single process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR=LOOPBACK, MASTER_PORT=str(free_port()))
    use_local_device(ranks)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


@dataclass
class StageResult:
    steps: int
    final_loss: dict[str, float]
    tokens_per_second: float
    routing: dict
    peak_memory_gib: float


def train_stage(config: RunConfig, round_index: int, stage: int, model_in: Path, checkpoint_dir: Path,
                export_dir: Path | None, resume: bool = True) -> StageResult:
    """Run one training stage on every rank; rank 0 exports the trained model to ``export_dir``."""
    import deepspeed

    settings = config.train.stage1 if stage == 1 else config.train.stage2
    dist = distributed.current()
    layout = Layout(config.train.ep_size, dist.world_size)
    if dist.world_size % layout.ep_size:
        raise LayerMoEError(f"train.ep_size={layout.ep_size} does not divide the number of processes "
                            f"({dist.world_size})")
    torch.manual_seed(config.seed)
    model = load_causal_lm(model_in, "float32", pick_device(config.model.device))
    if not isinstance(model, LayerMoEForCausalLM):
        raise LayerMoEError(f"{model_in} is a dense model; training needs the upcycled model (run upcycle first)")
    checkpoint = latest_checkpoint(checkpoint_dir) if resume else None
    other_layout = checkpoint is not None and checkpoint.layout != layout
    if other_layout:
        rng_state = load_weights(model, checkpoint)
    if layout.ep_size > 1:
        placements = shard_model(model, expert_parallel_group(layout.ep_size))
    trainable = set_trainable(model, trainable_roles(stage, len(model.config.rounds)))
    if not trainable:
        raise LayerMoEError(f"stage {stage} has nothing to train in {model_in} (no new experts/routers/classifiers)")
    params = [p for p in model.parameters() if p.requires_grad]
    if layout.ep_size > 1:
        mark_expert_parameters(model, layout.ep_size)
        if stage == 1:  # trains experts: DeepSpeed reduces their gradients over the expert-data-parallel groups
            _check_every_rank_trains_an_expert(model, placements, layout.ep_size)
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

            params = split_params_into_different_moe_groups_for_optimizer({"params": params, "name": "dense"})
    model.train()
    data = build_stage_data(config, round_index, stage, load_tokenizer(model_in))
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=config.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, settings))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config.train.ds_config, settings, config.train.gradient_clipping))
    start = 0
    if other_layout:
        start = resume_other_layout(scheduler, checkpoint, layout, rng_state)
    elif checkpoint is not None:
        start = resume_same_layout(engine, checkpoint)
    log.info(f"stage {stage}: {len(trainable)} trainable tensors "
             f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters), "
             f"{len(data.blocks)} blocks, steps {start}..{settings.steps}, world {dist.world_size}, "
             f"ep_size {layout.ep_size}")
    reporter = _Reporter(config, stage, settings, checkpoint_dir, start)
    losses: dict[str, float] = {}
    device = torch.device(engine.device)
    for step in range(start, settings.steps):
        lr = scheduler.get_last_lr()[0]  # the rate this step uses (engine.step moves the schedule on)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(settings.gradient_accumulation):
            index = micro_batch_indices(len(data.blocks), step, micro, settings.gradient_accumulation,
                                        dist.rank, dist.world_size, settings.micro_batch_size)
            input_ids = data.blocks.input_ids[index].to(device)
            original = data.original_mask(data.blocks.language_ids[index]).to(device)
            logits = engine(input_ids=input_ids, use_cache=False).logits
            records = {i: b.last_routing for i, b in moe_blocks(engine.module).items()}
            parts = stage_loss(stage, logits, input_ids, records, original, config.train.alpha, config.train.gamma,
                               config.train.beta, config.train.lpr_form)
            _check_finite(parts, step, checkpoint_dir)
            engine.backward(parts.total)
            engine.step()
            reporter.routing.add(records, original.reshape(-1))
            for name, value in vars(parts).items():
                if value is not None:
                    sums[name] = sums.get(name, 0) + value.detach()
        losses = _batch_mean(sums, settings.gradient_accumulation * dist.world_size)
        reporter.step_done(step, losses, lr, input_ids.numel() * settings.gradient_accumulation * dist.world_size)
        if config.train.checkpoint_every and (step + 1) % config.train.checkpoint_every == 0 and step + 1 < settings.steps:
            save_checkpoint(engine, checkpoint_dir, step + 1, layout)
    save_checkpoint(engine, checkpoint_dir, settings.steps, layout)
    distributed.barrier()
    if export_dir is not None and dist.is_main:
        _export(engine.module, latest_checkpoint(checkpoint_dir), export_dir, model_in)
    distributed.barrier()
    peak = peak_memory_gib(device)
    log.info(f"stage {stage} done: {reporter.tokens_per_second():,.0f} tok/s, peak memory of rank {dist.rank} "
             f"{peak:.2f} GiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
    return StageResult(settings.steps, losses, reporter.tokens_per_second(), reporter.last_routing, peak)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on ``device`` when it is a GPU, else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _batch_mean(sums: dict[str, torch.Tensor], micro_batches: int) -> dict[str, float]:
    """Each loss part averaged over the step's micro-batches on every rank (the loss of the global batch)."""
    names = list(sums)  # the same order on every rank
    if not names:
        return {}
    values = distributed.all_reduce_sum(torch.stack([sums[n] for n in names]).float()) / micro_batches
    return dict(zip(names, values.tolist()))


def _check_finite(parts, step: int, checkpoint_dir: Path) -> None:
    flag = (~torch.isfinite(parts.total.detach())).float().reshape(1)
    if float(distributed.all_reduce_sum(flag)) > 0:
        latest = (checkpoint_dir / "latest").read_text().strip() if (checkpoint_dir / "latest").exists() else None
        raise TrainingDiverged(
            f"non-finite loss at step {step + 1}: {parts.as_floats()}; stopping. "
            + (f"The last good checkpoint is {checkpoint_dir / latest} (resume continues from it)." if latest
               else "No checkpoint was written yet."))


def _check_every_rank_trains_an_expert(model: LayerMoEForCausalLM, placements, ep_size: int) -> None:
    """DeepSpeed's optimizer needs trainable expert parameters on every rank of an expert-parallel group."""
    trained_round = len(model.config.rounds)
    rounds = model.config.expert_rounds
    counts = [sum(rounds[i][e] == trained_round for i, p in placements.items() for e in p.owned(rank))
              for rank in range(ep_size)]
    if min(counts) == 0:
        raise LayerMoEError(f"train.ep_size={ep_size}: this round adds {sum(counts)} new experts, fewer than the "
                            f"{ep_size} expert-parallel ranks; use train.ep_size <= {max(sum(counts), 1)}")


def _export(model: LayerMoEForCausalLM, checkpoint, export_dir: Path, model_in: Path) -> None:
    """Save the trained model as an HF directory; with expert parallelism, the experts other ranks hold come
    from the final checkpoint's shards."""
    from pipeline.checkpoint import save_expanded

    if checkpoint.layout.ep_size > 1:
        unshard_model(model, expert_shards(checkpoint))
    model.eval()
    save_expanded(model, export_dir, tokenizer_from=model_in)


class _Reporter:
    """One dense log line per step, a progress bar on a terminal, routing statistics at intervals."""

    def __init__(self, config: RunConfig, stage: int, settings: StageTrainConfig, work_dir: Path, start: int):
        self.config, self.stage, self.settings, self.work_dir = config, stage, settings, work_dir
        self.start, self.started, self.tokens = start, time.perf_counter(), 0
        self.routing = RoutingStats()
        self.last_routing: dict = {}
        self.history: list[dict] = []
        self.bar = None
        if sys.stderr.isatty() and distributed.current().is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=settings.steps, initial=start, desc=f"stage {stage}", leave=False)
        self.writer = None
        if config.train.tensorboard and distributed.current().is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(work_dir / "tensorboard"))

    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)

    def step_done(self, step: int, values: dict[str, float], lr: float, tokens: int) -> None:
        self.tokens += tokens
        done = step + 1
        rate = self.tokens_per_second()
        eta = (self.settings.steps - done) * (time.perf_counter() - self.started) / max(done - self.start, 1)
        weights = {"balance": self.config.train.alpha, "lpr": self.config.train.gamma, "classifier": self.config.train.beta}
        terms = " ".join(f"{k} {v:.4f}" + (f" (x{weights[k]}={weights[k] * v:.4f})" if k in weights else "")
                         for k, v in values.items() if k != "total")
        line = (f"stage {self.stage} step {done}/{self.settings.steps} | loss {values['total']:.4f} | {terms} | "
                f"lr {lr:.2e} | {rate:,.0f} tok/s | ETA {eta:.0f}s")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.write(line)
        else:
            log.info(line)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"stage{self.stage}/{k}", v, done)
            self.writer.add_scalar(f"stage{self.stage}/lr", lr, done)
        if done % self.config.train.stats_every == 0 or done == self.settings.steps:
            self._report_routing(done)

    def _report_routing(self, step: int) -> None:
        log.info(f"stage {self.stage} routing @ step {step}: {self.routing.one_line()}")
        self.last_routing = self.routing.summary()
        if distributed.current().is_main:
            self.history.append({"step": step, "layers": self.last_routing})
            write_json(self.work_dir / "routing_stats.json", self.history)
        self.routing = RoutingStats()


def describe_settings(config: RunConfig, stage: int) -> dict:
    """The config slice a training stage depends on (for its manifest)."""
    excluded = ("stage1", "stage2", "ep_size")  # ep_size: a layout choice, checkpoints move between layouts
    return {"train": {k: v for k, v in to_dict(config.train).items() if k not in excluded},
            "stage": to_dict(config.train.stage1 if stage == 1 else config.train.stage2), "seed": config.seed}
