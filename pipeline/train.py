"""Training stages 1 and 2 with DeepSpeed (PAPER.md 2, 3.3-3.5).

* stage 1: trainable = this round's new experts + routers; loss = CE + alpha * load balance; new languages.
* stage 2: trainable = routers + classifiers; loss = CE + gamma * LPR + beta * classifier CE; new + replay.

The model is the previous stage's exported HF directory; the result is exported the same way. DeepSpeed
checkpoints (weights, optimizer, scheduler, step, RNG) are written every ``checkpoint_every`` steps and at the
end into a work directory that survives interruptions, so ``resume`` continues where a run stopped and ends
with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import distributed, log
from pipeline.atomic import write_json
from pipeline.base_model import load_causal_lm, pick_device
from pipeline.config import RunConfig, StageTrainConfig, to_dict
from pipeline.errors import LayerMoEError
from pipeline.hf_modeling.modeling_layermoe import LayerMoEForCausalLM, moe_blocks
from pipeline.losses import stage_loss
from pipeline.packing import load_tokenizer
from pipeline.routing_stats import RoutingStats
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
    if not file.is_file() and not file.is_absolute():  # ds_configs/ of this project, wherever we run from
        file = Path(__file__).resolve().parents[1] / path
    if not file.is_file():
        raise LayerMoEError(f"train.ds_config: DeepSpeed config {path!r} does not exist")
    try:
        ds = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LayerMoEError(f"train.ds_config: {path} is not valid JSON ({e})") from None
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


def train_stage(config: RunConfig, round_index: int, stage: int, model_in: Path, checkpoint_dir: Path,
                export_dir: Path | None, resume: bool = True) -> StageResult:
    """Run one training stage on every rank; rank 0 exports the trained model to ``export_dir``."""
    import deepspeed

    settings = config.train.stage1 if stage == 1 else config.train.stage2
    dist = distributed.current()
    torch.manual_seed(config.seed)
    model = load_causal_lm(model_in, "float32", pick_device(config.model.device))
    if not isinstance(model, LayerMoEForCausalLM):
        raise LayerMoEError(f"{model_in} is a dense model; training needs the upcycled model (run upcycle first)")
    trainable = set_trainable(model, trainable_roles(stage, len(model.config.rounds)))
    if not trainable:
        raise LayerMoEError(f"stage {stage} has nothing to train in {model_in} (no new experts/routers/classifiers)")
    model.train()
    data = build_stage_data(config, round_index, stage, load_tokenizer(model_in))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=config.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, settings))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config.train.ds_config, settings, config.train.gradient_clipping))
    start = _resume(engine, checkpoint_dir) if resume else 0
    log.info(f"stage {stage}: {len(trainable)} trainable tensors "
             f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters), "
             f"{len(data.blocks)} blocks, steps {start}..{settings.steps}, world {dist.world_size}")
    reporter = _Reporter(config, stage, settings, checkpoint_dir, start)
    parts = None
    device = engine.device
    for step in range(start, settings.steps):
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
        reporter.step_done(step, parts, scheduler.get_last_lr()[0], input_ids.numel() * settings.gradient_accumulation * dist.world_size)
        if config.train.checkpoint_every and (step + 1) % config.train.checkpoint_every == 0 and step + 1 < settings.steps:
            _save(engine, checkpoint_dir, step + 1)
    _save(engine, checkpoint_dir, settings.steps)
    if export_dir is not None and dist.is_main:
        from pipeline.checkpoint import save_expanded

        engine.module.eval()
        save_expanded(engine.module, export_dir, tokenizer_from=model_in)
    distributed.barrier()
    return StageResult(settings.steps, parts.as_floats() if parts else {}, reporter.tokens_per_second(),
                       reporter.last_routing)


def _check_finite(parts, step: int, checkpoint_dir: Path) -> None:
    flag = torch.tensor([0.0 if torch.isfinite(parts.total) else 1.0])
    if float(distributed.all_reduce_sum(flag)) > 0:
        latest = (checkpoint_dir / "latest").read_text().strip() if (checkpoint_dir / "latest").exists() else None
        raise TrainingDiverged(
            f"non-finite loss at step {step + 1}: {parts.as_floats()}; stopping. "
            + (f"The last good checkpoint is {checkpoint_dir / latest} (resume continues from it)." if latest
               else "No checkpoint was written yet."))


def _save(engine, checkpoint_dir: Path, step: int) -> None:
    engine.save_checkpoint(str(checkpoint_dir), tag=f"step{step}",
                           client_state={"step": step, "torch_rng": torch.get_rng_state()})
    log.info(f"checkpoint step{step} saved in {checkpoint_dir}")


def _resume(engine, checkpoint_dir: Path) -> int:
    if not (checkpoint_dir / "latest").exists():
        return 0
    path, client = engine.load_checkpoint(str(checkpoint_dir))
    if path is None:
        raise LayerMoEError(f"cannot load the DeepSpeed checkpoint in {checkpoint_dir} (corrupt?); "
                            f"delete the directory to start the stage over")
    torch.set_rng_state(client["torch_rng"])
    log.info(f"resumed from {path} at step {client['step']}")
    return int(client["step"])


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

    def step_done(self, step: int, parts, lr: float, tokens: int) -> None:
        self.tokens += tokens
        done = step + 1
        rate = self.tokens_per_second()
        eta = (self.settings.steps - done) * (time.perf_counter() - self.started) / max(done - self.start, 1)
        values = parts.as_floats()
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
    return {"train": {k: v for k, v in to_dict(config.train).items() if k not in ("stage1", "stage2")},
            "stage": to_dict(config.train.stage1 if stage == 1 else config.train.stage2), "seed": config.seed}
