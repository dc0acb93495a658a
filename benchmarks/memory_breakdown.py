"""Where the host memory of a training stage goes, on CPU: peak RSS of every phase, and the live tensors by kind.

Runs one training stage (``pipeline.train``) in this process, for a few steps, on a run whose earlier stages
are done (prepare it with ``layermoe run CONFIG ... --until upcycle``), and prints

* per phase (model load, data, DeepSpeed initialisation, then forward + loss, backward and optimizer step of
  every step): the RSS at its end and its peak (Linux VmHWM, reset between phases through /proc/self/clear_refs);
* by kind: weights (frozen, trainable), gradients, optimizer states, other live tensors (DeepSpeed's flat
  buffers and partitions, the training data), activations saved for the backward (every tensor autograd keeps,
  by decoder layer and outside the layers, parameters excluded) and the full-vocabulary logits; the rest of the
  peak is the allocator and the framework.

Numbers are this process's; other processes on the machine do not count, but they do slow it down.

    python benchmarks/memory_breakdown.py configs/default.yaml name=mem run_dir=/tmp/mem \\
        allocate.method=uniform allocate.experts_per_layer=2 train.stage1.micro_batch_size=4 \\
        train.stage1.block_length=512 train.stage1.steps=2 [train.loss_chunk_tokens=0] [--stage 1] [--round g1]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import train
from pipeline.base_model import decoder_layers
from pipeline.config import load_config
from pipeline.log import human_bytes
from pipeline.memory import process_status_bytes
from pipeline.training_checkpoint import ResumePoint

GiB = 2**30


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


@dataclass
class Phases:
    """RSS at the end of each phase and its peak, in the order the phases ran."""

    rows: list[tuple[str, int, int]] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str):
        _reset_peak()
        try:
            yield
        finally:
            self.rows.append((name, process_status_bytes("VmRSS"), process_status_bytes("VmHWM")))


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared tensors counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class SavedActivations:
    """Every tensor autograd saves for the backward during one forward, by decoder layer (or 'outside the layers'),
    parameters excluded, each storage counted once; :meth:`forward_done` keeps the largest forward's totals."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.current = "outside the layers"
        self.by_place: dict[str, dict[int, int]] = {}
        self.largest = (0, 0, 0)
        self.handles = []
        for i, layer in enumerate(decoder_layers(model)):
            self.handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: self._enter(f"layer {i}")))
            self.handles.append(layer.register_forward_hook(lambda m, a, o: self._enter("outside the layers")))

    def _enter(self, place: str) -> None:
        self.current = place

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params and tensor.device.type != "meta":
            self.by_place.setdefault(self.current, {})[storage.data_ptr()] = storage.nbytes()
        return tensor

    def forward_done(self) -> None:
        """Keep this forward's (all, per decoder layer on average, outside the layers) bytes if the largest."""
        layers = [sum(v.values()) for k, v in self.by_place.items() if k.startswith("layer")]
        outside = sum(self.by_place.get("outside the layers", {}).values())
        self.largest = max(self.largest, (sum(layers) + outside, sum(layers) // max(len(layers), 1), outside))
        self.by_place = {}


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage the garbage collector can reach."""
    gc.collect()
    return unique_bytes(o for o in gc.get_objects() if isinstance(o, torch.Tensor))


def optimizer_state_tensors(engine) -> list[torch.Tensor]:
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=1)
    parser.add_argument("--round", default=None, help="round name (default: the first)")
    args, overrides = parser.parse_known_args()
    config = load_config(args.config, overrides)
    round_index = config.round_index(args.round) if args.round else 0
    model_in = config.run_path / config.rounds[round_index].name / (
        "upcycle" if args.stage == 1 else "train_stage1") / "model"
    train.init_deepspeed_distributed()
    phases = Phases()
    start_rss = process_status_bytes("VmRSS")
    with tempfile.TemporaryDirectory() as checkpoints:
        run = train.TrainingRun(config, round_index, args.stage, model_in, Path(checkpoints), train.Layout(
            config.train.ep_size, 1))
        resume = ResumePoint(None, True, run.layout)
        load_model, build_data, initialize = train._load_model, train.stage_data, train.deepspeed.initialize

        def metered(name, fn):
            def wrapper(*a, **k):
                with phases.phase(name):
                    return fn(*a, **k)
            return wrapper

        train._load_model = metered("load the model", load_model)
        train.stage_data = metered("build the data", build_data)
        train.deepspeed.initialize = metered("deepspeed.initialize", initialize)
        try:
            trainer = train.build_engine(run, resume)
        finally:
            train._load_model, train.stage_data, train.deepspeed.initialize = load_model, build_data, initialize
        engine, model = trainer.engine, trainer.engine.module
        params = list(model.parameters())
        frozen = unique_bytes(p for p in params if not p.requires_grad)
        trainable = unique_bytes(p for p in params if p.requires_grad)
        saved = SavedActivations(model)
        micro_batch_loss, backward, step = train._micro_batch_loss, engine.backward, engine.step
        grads = 0

        def forward_and_loss(*a, **k):
            with phases.phase(f"step {engine.global_steps + 1}: forward + loss"), \
                    torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                result = micro_batch_loss(*a, **k)
            saved.forward_done()
            return result

        def metered_backward(*a, **k):
            nonlocal grads
            with phases.phase(f"step {engine.global_steps + 1}: backward"):
                result = backward(*a, **k)
            grads = max(grads, unique_bytes(p.grad for p in params))
            return result

        def metered_step(*a, **k):
            with phases.phase(f"step {engine.global_steps + 1}: optimizer step"):
                return step(*a, **k)

        train._micro_batch_loss, engine.backward, engine.step = forward_and_loss, metered_backward, metered_step
        routing = train.RoutingStats()
        for s in range(run.settings.steps):
            outcome = train.train_step(run, trainer, s, routing)
            print(f"step {s + 1}: loss {outcome.losses['total']:.4f}", flush=True)
        train._micro_batch_loss = micro_batch_loss
        optimizer_states = unique_bytes(optimizer_state_tensors(engine))
        live = live_tensor_bytes()
    settings = run.settings
    activations, per_layer, outside = saved.largest
    vocab = model.config.vocab_size
    tokens = settings.micro_batch_size * settings.block_length
    chunk = config.train.loss_chunk_tokens
    logits = (min(chunk, tokens) if chunk else tokens) * vocab * 4
    peak = max(p for _, _, p in phases.rows)
    print(f"\n{model_in}: stage {args.stage}, micro-batch {settings.micro_batch_size} x {settings.block_length}, "
          f"{config.train.ds_config}, loss_chunk_tokens {chunk}, activation_checkpointing "
          f"{config.train.activation_checkpointing}, ep_size {config.train.ep_size}")
    print(f"\n{'phase':34} {'RSS at end':>12} {'peak':>12}")
    print(f"{'before loading the model':34} {human_bytes(start_rss):>12}")
    for name, end, high in phases.rows:
        print(f"{name:34} {human_bytes(end):>12} {human_bytes(high):>12}")
    others = live - frozen - trainable - optimizer_states
    print(f"\nlive tensors after the last step: {human_bytes(live)}")
    rows = [("weights, frozen", frozen), ("weights, trainable", trainable),
            ("gradients (largest after a backward)", grads), ("optimizer states", optimizer_states),
            ("other live tensors (DeepSpeed buffers, data)", max(others, 0)),
            ("activations saved for the backward", activations), ("  per decoder layer (average)", per_layer),
            ("  outside the layers (embeddings, loss)", outside),
            (f"fp32 logits of {'one chunk' if chunk else 'the micro-batch'}, one copy", logits)]
    for name, value in rows:
        print(f"{name:46} {human_bytes(value):>12}")
    print(f"{'peak RSS of the stage':46} {human_bytes(peak):>12}  (before the model: {human_bytes(start_rss)})")


if __name__ == "__main__":
    main()
