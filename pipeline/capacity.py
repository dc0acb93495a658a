"""Capacity planning: does a config's training fit on the GPUs, and how long does it take? (``layermoe plan CONFIG``)

Everything comes from the run config and the model's config.json, no weights: the DeepSpeed config (ZeRO stage,
precision, reduce bucket, overlap), ``train.ep_size``, each stage's micro-batch, block length, accumulation and
steps, ``train.loss_chunk_tokens`` and ``train.activation_checkpointing``; the experts of every round from the
round's allocation.json when the allocate stage has run, else from the allocate settings with equal similarity
in every layer (said in the output). Per training stage of every round, for the rank that holds the most:

* weights: frozen and trainable, in the training precision; with expert parallelism only the rank's experts
  (``pipeline.expert_parallel.place_experts``);
* optimizer states as DeepSpeed keeps them: ZeRO-0 (the client AdamW on the parameters: two fp32 moments, and
  an fp32 master copy in bf16), ZeRO-1/2 (``DeepSpeedZeroOptimizer``, also for bf16 unless the DeepSpeed config
  sets ``data_types.grad_accum_dtype: fp32``: an fp32 master copy and two fp32 moments of this rank's partition),
  bf16 ZeRO-1 with fp32 gradient accumulation (``BF16_Optimizer``). Partitions are over the data-parallel group,
  and for the experts over the expert-data-parallel group (world / ep_size ranks);
* gradients as they stand at the optimizer step: the parameters' full gradients (ZeRO-0, ZeRO-1), this rank's
  flattened partition and its fp32 copy (ZeRO-1, ZeRO-2; no copy in fp32), ``BF16_Optimizer``'s full fp32
  accumulator;
* the optimizer step's temporaries: torch's AdamW (the client optimizer) makes two partition-sized fp32
  temporaries per parameter group on CPU (one tensor at a time) and one on a GPU (its foreach path);
* activations, from the shapes of the decoder layer's saved tensors (norms, attention with SDPA, router,
  dispatch, each routed slot's expert MLP; ``tests/test_capacity.py`` checks the formula against the tensors
  autograd saves): every layer from the lowest trainable one up, or with activation checkpointing only each
  layer's input plus one layer recomputed; the LM head's fp32 logits, their log-softmax and gradients for the
  micro-batch, or for one chunk (the backward frees each layer's saved tensors as it makes that layer's
  gradients: measured, the peak stays below the saved tensors plus one layer's gradients);
* communication buffers: ZeRO-2's contiguous gradient bucket (``reduce_bucket_size``, two with
  ``overlap_comm``), which lives for the whole run;
* a framework allowance: on a GPU for the CUDA context and NCCL (``GPU_FRAMEWORK_BYTES``, an assumption), on CPU
  what a training process grows by besides the model (``CPU_FRAMEWORK_BYTES``, measured).

Activations are freed before the optimizer step and gradients are built while they are freed, so the peak is
the memory held for the whole run (weights, optimizer states, buffers, allowance) plus the larger of the
forward/backward working set (activations) and the optimizer step's (gradients and the step's temporaries).
``tests/test_capacity_validation.py`` compares the total with the peak resident memory of real CPU training
runs (1 process and 2 ranks with ep_size 2, fp32 and bf16).

Compute ("6N" for trained, "4N" for frozen parameters gradients pass through, "2N" below them): FLOPs per token
= 2 x (activated matmul parameters, the LM head included) + attention (4 x block length x attention width per
layer) forward; the input gradients of what gradients pass through (the LM head and the layers above the lowest
one that trains something) cost another forward, attention's twice; the weight gradients of the activated
trainable parameters 2 x their count (experts: with uniform routing, a slot lands on a trained expert with
probability new / E_i); activation checkpointing and the chunked loss add a forward of what they recompute.
Step time = FLOPs per step / (GPUs x peak x MFU).

On CPU (``Hardware.kind == "cpu"``) the same model predicts the growth of a process's resident memory from
before the model is loaded to its peak: a preallocated buffer counts only as far as it is written (pages never
touched are not resident).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from pipeline.allocate import allocate, read_allocation
from pipeline.base_model import resolve_model_path
from pipeline.config import RunConfig, StageTrainConfig, TrainingStage
from pipeline.ds_config import deepspeed_config, precision
from pipeline.errors import LayerMoEError
from pipeline.expert_parallel import place_experts
from pipeline.log import human_bytes
from pipeline.plan import ParameterPlan, plan
from pipeline.run_dir import stage_dir

GPU_FRAMEWORK_BYTES = int(1.5 * 2**30)  # CUDA context, cuBLAS workspace, NCCL buffers: an allowance, not measured
# What a CPU training process grows by besides the model (DeepSpeed's modules and structures imported and built at
# initialisation, kernel workspaces): 77-79 MiB for a 2-layer, 32-wide model, whose own tensors are under 1 MiB
CPU_FRAMEWORK_BYTES = 78 * 2**20
DEFAULT_MFU = 0.35
DEFAULT_PEAK_TFLOPS = 312.0  # A100 bf16 dense; H100 SXM: 989
DEFAULT_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)


@dataclass(frozen=True)
class Hardware:
    """Where the training runs: ``gpus_per_node`` x ``nodes`` devices of ``memory_bytes`` each and ``peak_flops``
    (in the training precision), at ``mfu``; ``kind="cpu"`` predicts host RSS instead (no framework allowance)."""

    gpus_per_node: int
    nodes: int
    memory_bytes: int
    peak_flops: float = DEFAULT_PEAK_TFLOPS * 1e12
    mfu: float = DEFAULT_MFU
    kind: Literal["gpu", "cpu"] = "gpu"

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a dense model's config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    attention_params_per_layer: int  # q, k, v, o projections
    parameters: ParameterPlan  # of the dense model with no experts added; ``plan`` gives the expanded counts

    @classmethod
    def from_config(cls, model_config: dict) -> ModelShape:
        layers = model_config["num_hidden_layers"]
        dense = plan(model_config, [1] * layers, [])
        hidden, heads = model_config["hidden_size"], model_config["num_attention_heads"]
        head_dim = model_config.get("head_dim") or hidden // heads
        kv_heads = model_config.get("num_key_value_heads") or heads
        return cls(hidden, layers, heads, kv_heads, head_dim, model_config["intermediate_size"],
                   model_config["vocab_size"], 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim, dense)

    @property
    def expert_params(self) -> int:
        """Parameters of one expert (the FFN of a layer)."""
        return self.parameters.expert_params_per_layer[0]


@dataclass(frozen=True)
class Expansion:
    """The experts after one round: totals per layer, the round that added each expert, the classifier layers,
    and where these numbers come from."""

    round_name: str
    round_number: int  # 1-based: the round whose experts stage 1 trains
    expert_rounds: list[list[int]]  # [layer][expert] -> round that added it (0: the original FFN)
    classifier_layers: list[int]
    source: str

    @property
    def experts_per_layer(self) -> list[int]:
        return [len(r) for r in self.expert_rounds]


@dataclass(frozen=True)
class TrainingSetup:
    """The settings of one training stage that decide its memory and time."""

    training_stage: TrainingStage
    zero_stage: int
    precision: str  # bf16 | fp16 | fp32
    fp32_gradient_accumulation: bool  # bf16 with data_types.grad_accum_dtype fp32 (DeepSpeed's BF16_Optimizer)
    reduce_bucket_size: int
    overlap_comm: bool
    ep_size: int
    micro_batch_size: int
    block_length: int
    gradient_accumulation: int
    steps: int
    loss_chunk_tokens: int
    activation_checkpointing: bool

    @property
    def bytes_per_weight(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch_size * self.block_length


@dataclass(frozen=True)
class Memory:
    """Bytes on one device (the rank that holds the most)."""

    frozen_weights: int
    trainable_weights: int
    gradients: int  # at the optimizer step
    optimizer_states: int
    step_temporaries: int  # the optimizer step's own temporaries
    activations: int  # everything below
    activations_per_layer: int  # one decoder layer's saved tensors (without checkpointing)
    dispatch: int  # MoE dispatch (gathered rows, expert outputs, all-to-all buffers), all layers
    lm_head: int  # logits, log-softmax and their gradients (micro-batch, or one chunk)
    communication: int
    framework: int

    @property
    def held(self) -> int:
        """What the whole run holds: weights, optimizer states, communication buffers, the framework allowance."""
        return (self.frozen_weights + self.trainable_weights + self.optimizer_states + self.communication
                + self.framework)

    @property
    def total(self) -> int:
        """The peak: what the run holds plus the larger of the forward/backward working set (activations) and
        the optimizer step's (gradients and the step's temporaries)."""
        return self.held + max(self.activations, self.gradients + self.step_temporaries)


@dataclass(frozen=True)
class Compute:
    """FLOPs and time of one training stage."""

    tokens_per_step: int
    flops_per_token: float
    steps: int
    step_seconds: float

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    @property
    def stage_seconds(self) -> float:
        return self.steps * self.step_seconds


@dataclass(frozen=True)
class StageEstimate:
    """One training stage of one round on given hardware."""

    expansion: Expansion
    setup: TrainingSetup
    memory: Memory
    compute: Compute
    device_memory: int
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.device_memory


# ----------------------------------------------------------------------------------------------------------
# Inputs: the training setup and every round's experts
# ----------------------------------------------------------------------------------------------------------


def training_setup(config: RunConfig, training_stage: TrainingStage) -> TrainingSetup:
    """The settings of one training stage, its DeepSpeed config included."""
    settings: StageTrainConfig = config.train.for_stage(training_stage)
    ds = deepspeed_config(config.train.ds_config, settings, config.train.gradient_clipping)
    zero = ds.get("zero_optimization", {})
    accumulation = str(ds.get("data_types", {}).get("grad_accum_dtype", "")).lower()
    return TrainingSetup(training_stage, int(zero.get("stage", 0)), precision(ds),
                         precision(ds) == "bf16" and accumulation in ("fp32", "float32", "float"),
                         int(float(zero.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET))),
                         bool(zero.get("overlap_comm", False)), config.train.ep_size, settings.micro_batch_size,
                         settings.block_length, settings.gradient_accumulation, settings.steps,
                         config.train.loss_chunk_tokens, config.train.activation_checkpointing)


def expansions(config: RunConfig, num_layers: int) -> list[Expansion]:
    """Every round's experts: from the round's allocation.json if the allocate stage has run, else from the
    allocate settings with equal similarity in every layer (reference: ceil(delta / layers) per layer; budget:
    spread evenly; classifiers: the lowest-index MoE layers)."""
    result: list[Expansion] = []
    rounds = [[0] for _ in range(num_layers)]
    for r, rnd in enumerate(config.rounds):
        file = stage_dir(config, r, "allocate") / "allocation.json"
        if file.is_file():
            allocation, source = read_allocation(file), f"{file}"
        else:
            settings = config.allocate_for(r)
            allocation = allocate(settings, [1.0] * num_layers, num_layers)
            source = (f"assumed (no allocation.json yet): allocate.method {settings.method}"
                      + ("" if settings.method in ("uniform", "explicit") else ", equal similarity in every layer"))
        if len(allocation.experts_per_layer) != num_layers:
            raise LayerMoEError(f"{source}: {len(allocation.experts_per_layer)} layers, the model has {num_layers}")
        rounds = [layer + [r + 1] * (n - 1) for layer, n in zip(rounds, allocation.experts_per_layer)]
        result.append(Expansion(rnd.name, r + 1, [list(layer) for layer in rounds],
                                list(allocation.classifier_layers), source))
    return result


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------


def _rank_parameters(shape: ModelShape, expansion: Expansion, setup: TrainingSetup,
                     rank: int) -> tuple[int, int, int]:
    """(frozen, trainable dense-group, trainable expert-group) parameter counts on expert-parallel rank ``rank``."""
    h, expert = shape.hidden, shape.expert_params
    moe_layers = [i for i, r in enumerate(expansion.expert_rounds) if len(r) > 1]
    placements = dict(zip(moe_layers, place_experts([expansion.expert_rounds[i] for i in moe_layers], setup.ep_size)))
    held_new = {i: [e for e in range(1, len(expansion.expert_rounds[i])) if placements[i].owners[e - 1] == rank]
                for i in moe_layers}
    routers = sum(h * len(expansion.expert_rounds[i]) for i in moe_layers)
    classifiers = 2 * h * len(expansion.classifier_layers)
    trained_experts = sum(expert for i, held in held_new.items() for e in held
                          if setup.training_stage == 1 and expansion.expert_rounds[i][e] == expansion.round_number)
    all_held = sum(expert * len(held) for held in held_new.values())
    dense_trainable = routers + (classifiers if setup.training_stage == 2 else 0)
    frozen = shape.parameters.dense_total + all_held - trained_experts + (
        classifiers if setup.training_stage == 1 else 0)
    return frozen, dense_trainable, trained_experts


@dataclass(frozen=True)
class OptimizerMemory:
    """Bytes of the trainable groups' gradients (at the optimizer step), optimizer states (fp32 master copies
    and Adam's moments), the step's temporaries and the communication buffers."""

    gradients: int
    states: int
    step_temporaries: int
    communication: int


def optimizer_memory(groups: list[tuple[int, int]], setup: TrainingSetup, hardware: Hardware) -> OptimizerMemory:
    """For trainable groups of (elements held, data-parallel degree over which ZeRO partitions them): what
    DeepSpeed's optimizer for ``setup`` keeps (see the module docstring)."""
    b = setup.bytes_per_weight
    fp32_copy = 0 if b == 4 else 4  # the gradient partition's fp32 copy for the step (none when already fp32)
    grads = states = temporaries = 0
    temporaries_per_element = 8 if hardware.kind == "cpu" else 4
    for n, degree in groups:
        part = math.ceil(n / degree)
        if setup.zero_stage == 0:  # the client AdamW on the parameters themselves
            grads += b * n
            states += 8 * n + (4 * n if b != 4 else 0)
            part = n
        elif setup.zero_stage == 1 and setup.fp32_gradient_accumulation:  # BF16_Optimizer
            grads += b * n + 4 * n
            states += 12 * part
        elif setup.zero_stage == 1:
            grads += b * n + (b + fp32_copy) * part
            states += 12 * part
        else:
            grads += (b + fp32_copy) * part
            states += 12 * part
        temporaries = max(temporaries, temporaries_per_element * part)  # the groups are stepped one at a time
    return OptimizerMemory(grads, states, temporaries, _communication(groups, setup, hardware))


def _communication(groups: list[tuple[int, int]], setup: TrainingSetup, hardware: Hardware) -> int:
    """ZeRO-2's contiguous gradient bucket (two with overlap_comm), in the training precision; on CPU only what
    the gradients fill. ZeRO-0 on several ranks: the flattened all-reduce bucket."""
    trainable = sum(n for n, _ in groups)
    if setup.zero_stage == 0:
        return 4 * trainable if hardware.world_size > 1 else 0
    if setup.zero_stage == 1:
        return 0
    buffers = 2 if setup.overlap_comm else 1
    filled = setup.reduce_bucket_size if hardware.kind == "gpu" else min(setup.reduce_bucket_size, trainable)
    return buffers * filled * setup.bytes_per_weight


def layer_activation_bytes(shape: ModelShape, tokens: int, experts: int, top_k: int, bytes_per_value: int) -> tuple[int, int]:
    """(all, MoE dispatch part) bytes one decoder layer saves for the backward over ``tokens`` tokens, from the
    tensors the HF implementation with SDPA attention and ``LayerMoEBlock`` keep (fp32 where the code computes in
    fp32: the RMS norms, the router): two norms (their fp32 input and rsqrt), attention (q, k, v, output, log-sum-
    exp), the router's input and probabilities, and per routed slot the gathered row, the expert MLP's four
    intermediate tensors and the weighted output (a dense layer: its MLP's three)."""
    h, b = shape.hidden, bytes_per_value
    attention = b * (2 * shape.heads * shape.head_dim + 2 * shape.kv_heads * shape.head_dim) + 4 * shape.heads
    norms = 8 * h + 8
    if experts == 1:
        return tokens * (norms + attention + 3 * b * shape.intermediate), 0
    k = min(top_k, experts)
    router = 4 * h + 12 * experts + 4 * k + 8
    dispatch = k * (3 * b * h + 24)
    mlp = k * 4 * b * shape.intermediate
    return tokens * (norms + attention + router + dispatch + mlp), tokens * dispatch


def lm_head_bytes(shape: ModelShape, rows: int, bytes_per_value: int) -> int:
    """The LM head's working set for ``rows`` positions: the logits (training precision and an fp32 copy), the
    log-softmax kept for the backward, and the gradients of both (fp32)."""
    extra = bytes_per_value if bytes_per_value != 4 else 0
    return rows * shape.vocab * (16 + extra)


def _activations(shape: ModelShape, expansion: Expansion, setup: TrainingSetup, top_k: int) -> tuple[int, int, int, int]:
    """(total, one layer, dispatch, LM head) activation bytes of one micro-batch on one rank."""
    tokens, b = setup.tokens_per_micro_batch, setup.bytes_per_weight
    counts = expansion.experts_per_layer
    lowest = min((i for i, n in enumerate(counts) if n > 1), default=0)  # routers train in both stages
    per_layer = [layer_activation_bytes(shape, tokens, counts[i], top_k, b) for i in range(lowest, shape.layers)]
    largest = max(a for a, _ in per_layer)
    dispatch = sum(d for _, d in per_layer)
    if setup.ep_size > 1:  # rows sent to and received from other ranks' experts, kept for the backward
        dispatch += sum(tokens * min(top_k, counts[i]) * 2 * b * shape.hidden for i in range(lowest, shape.layers)
                        if counts[i] > 1)
    if setup.activation_checkpointing:
        layers = (shape.layers - lowest) * tokens * b * shape.hidden + largest  # inputs kept, one layer recomputed
        dispatch = max(d for _, d in per_layer)
    else:
        layers = sum(a for a, _ in per_layer) + (dispatch - sum(d for _, d in per_layer))
    chunk = setup.loss_chunk_tokens
    head = lm_head_bytes(shape, min(chunk, tokens) if chunk else tokens, b)
    final_norm = tokens * (8 * shape.hidden + 4)
    return layers + head + final_norm, largest, dispatch, head


def memory_estimate(shape: ModelShape, expansion: Expansion, setup: TrainingSetup, hardware: Hardware,
                    top_k: int = 2) -> Memory:
    """Bytes on the device of the expert-parallel rank that needs the most."""
    world = hardware.world_size
    if world % setup.ep_size:
        raise LayerMoEError(f"train.ep_size={setup.ep_size} does not divide the number of GPUs ({world})")
    activations, per_layer, dispatch, head = _activations(shape, expansion, setup, top_k)
    best: Memory | None = None
    for rank in range(setup.ep_size):
        frozen, dense, experts = _rank_parameters(shape, expansion, setup, rank)
        if setup.ep_size > 1:
            groups = [(dense, world), (experts, world // setup.ep_size)]
        else:
            groups = [(dense + experts, world)]
        groups = [(n, d) for n, d in groups if n]
        optimizer = optimizer_memory(groups, setup, hardware)
        b = setup.bytes_per_weight
        memory = Memory(frozen * b, (dense + experts) * b, optimizer.gradients, optimizer.states,
                        optimizer.step_temporaries, activations, per_layer, dispatch, head, optimizer.communication,
                        GPU_FRAMEWORK_BYTES if hardware.kind == "gpu" else CPU_FRAMEWORK_BYTES)
        if best is None or memory.total > best.total:
            best = memory
    return best


# ----------------------------------------------------------------------------------------------------------
# Compute
# ----------------------------------------------------------------------------------------------------------


def compute_estimate(shape: ModelShape, expansion: Expansion, setup: TrainingSetup, hardware: Hardware,
                     top_k: int = 2) -> Compute:
    """FLOPs per token and the step and stage time at ``hardware.mfu`` (see the module docstring)."""
    h, s = shape.hidden, setup.block_length
    counts = expansion.expert_rounds
    lowest = min((i for i, r in enumerate(counts) if len(r) > 1), default=0)
    attention_scores = 4 * s * shape.heads * shape.head_dim  # QK^T and AV, forward, per layer and token
    forward = backward = recompute = trained = 0.0
    for i, rounds in enumerate(counts):
        experts = len(rounds)
        k = min(top_k, experts)
        layer = 2 * (shape.attention_params_per_layer + k * shape.expert_params) + attention_scores
        if experts > 1:
            layer += 2 * h * experts + (4 * h if i in expansion.classifier_layers else 0)
            new = sum(1 for r in rounds if r == expansion.round_number)
            trained += 2 * h * experts + (4 * h if setup.training_stage == 2 and i in expansion.classifier_layers
                                          else 0)
            if setup.training_stage == 1:
                trained += 2 * k * new / experts * shape.expert_params
        forward += layer
        if i > lowest:  # gradients w.r.t. the layer's input: only above the lowest layer that trains something
            backward += layer + attention_scores  # the input gradients cost a forward, attention's twice
        if i >= lowest:
            recompute += layer if setup.activation_checkpointing else 0
    head = 2 * h * shape.vocab
    forward += head
    backward += head
    recompute += head if setup.loss_chunk_tokens else 0
    per_token = forward + backward + trained + recompute
    tokens = setup.tokens_per_micro_batch * setup.gradient_accumulation * hardware.world_size
    step = per_token * tokens / (hardware.world_size * hardware.peak_flops * hardware.mfu)
    return Compute(tokens, per_token, setup.steps, step)


# ----------------------------------------------------------------------------------------------------------
# The plan and what to change when it does not fit
# ----------------------------------------------------------------------------------------------------------


def estimate(shape: ModelShape, expansion: Expansion, setup: TrainingSetup, hardware: Hardware,
             top_k: int = 2) -> StageEstimate:
    """Memory and compute of one training stage, with suggestions when it does not fit."""
    result = StageEstimate(expansion, setup, memory_estimate(shape, expansion, setup, hardware, top_k),
                           compute_estimate(shape, expansion, setup, hardware, top_k), hardware.memory_bytes)
    if result.fits:
        return result
    return replace(result, suggestions=_suggestions(shape, expansion, setup, hardware, top_k))


def _suggestions(shape: ModelShape, expansion: Expansion, setup: TrainingSetup, hardware: Hardware,
                 top_k: int) -> list[str]:
    """Config changes that make the stage fit, each with its estimated total: every single change that is enough,
    or else the cheapest combination (checkpointing, chunked loss, ZeRO-2, then ep_size, then the micro-batch)."""
    name = f"train.stage{setup.training_stage}"
    new_experts = sum(1 for layer in expansion.expert_rounds for r in layer if r == expansion.round_number)
    ep_sizes = [ep for ep in range(setup.ep_size + 1, hardware.world_size + 1)
                if hardware.world_size % ep == 0 and (setup.training_stage == 2 or ep <= new_experts)]

    def micro(size: int) -> tuple[str, dict]:
        accumulation = math.ceil(setup.micro_batch_size * setup.gradient_accumulation / size)
        return (f"{name}.micro_batch_size={size} {name}.gradient_accumulation={accumulation} (same tokens per step)",
                dict(micro_batch_size=size, gradient_accumulation=accumulation))

    levers = [("train.activation_checkpointing=true", dict(activation_checkpointing=True))] * (
        not setup.activation_checkpointing) + [("train.loss_chunk_tokens=1024", dict(loss_chunk_tokens=1024))] * (
        not setup.loss_chunk_tokens) + [("a ZeRO-2 train.ds_config (e.g. ds_configs/zero2_bf16.json)",
                                         dict(zero_stage=2))] * (setup.zero_stage < 2)
    choices = [[(f"train.ep_size={ep}", dict(ep_size=ep)) for ep in ep_sizes],
               [micro(size) for size in range(setup.micro_batch_size - 1, 0, -1)]]

    def total(changes: dict) -> int:
        return memory_estimate(shape, expansion, replace(setup, **changes), hardware, top_k).total

    singles = [(label, changes) for label, changes in levers + choices[0] + choices[1]]
    lines = [f"{label}: {human_bytes(total(changes))}" for label, changes in singles
             if total(changes) <= hardware.memory_bytes]
    if lines:
        return lines
    labels, changes = [label for label, _ in levers], {k: v for _, c in levers for k, v in c.items()}
    for options in choices:  # the first ep_size, then the largest micro-batch, that fits; else the extreme one
        if not options or total(changes) <= hardware.memory_bytes:
            continue
        label, extra = next(((label, extra) for label, extra in options
                             if total({**changes, **extra}) <= hardware.memory_bytes), options[-1])
        labels.append(label)
        changes.update(extra)
    needed = total(changes)
    verdict = "" if needed <= hardware.memory_bytes else "; still too large: more GPUs (ep_size) or larger ones"
    return [f"no single change is enough; together: {', '.join(labels)}: {human_bytes(needed)}{verdict}"]


def plan_config(config: RunConfig, model_config: dict, hardware: Hardware) -> list[StageEstimate]:
    """Both training stages of every round of ``config`` on ``hardware``."""
    shape = ModelShape.from_config(model_config)
    return [estimate(shape, expansion, training_setup(config, stage), hardware, config.upcycle.top_k)
            for expansion in expansions(config, shape.layers) for stage in (1, 2)]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_capacity(config: RunConfig, model_name: str, estimates: list[StageEstimate], hardware: Hardware) -> str:
    """The plan as text: per round, a table of memory and compute per GPU for stages 1 and 2, then warnings."""
    setup = estimates[0].setup
    lines = [f"{config.name}: {hardware.nodes} node(s) x {hardware.gpus_per_node} GPU(s) of "
             f"{human_bytes(hardware.memory_bytes)}, peak {hardware.peak_flops / 1e12:.0f} TFLOP/s each at MFU "
             f"{hardware.mfu:.2f}" if hardware.kind == "gpu" else
             f"{config.name}: {hardware.world_size} CPU process(es), host memory (RSS growth) per process",
             f"model {model_name}; {config.train.ds_config} (ZeRO-{setup.zero_stage}, {setup.precision}); "
             f"ep_size {setup.ep_size}; loss_chunk_tokens {setup.loss_chunk_tokens}; activation_checkpointing "
             f"{str(setup.activation_checkpointing).lower()}"]
    for first in range(0, len(estimates), 2):
        pair = estimates[first:first + 2]
        expansion = pair[0].expansion
        lines += ["", f"round {expansion.round_name}: experts per layer {expansion.experts_per_layer} "
                      f"({sum(n - 1 for n in expansion.experts_per_layer)} new in all), classifier layers "
                      f"{expansion.classifier_layers}", f"  from {expansion.source}"]
        rows = [("micro-batch x block (x accumulation)", lambda e: f"{e.setup.micro_batch_size} x "
                 f"{e.setup.block_length} (x {e.setup.gradient_accumulation})"),
                ("frozen weights", lambda e: human_bytes(e.memory.frozen_weights)),
                ("trainable weights", lambda e: human_bytes(e.memory.trainable_weights)),
                ("optimizer states (fp32 master + Adam)", lambda e: human_bytes(e.memory.optimizer_states)),
                ("communication buffers", lambda e: human_bytes(e.memory.communication)),
                ("CUDA context, NCCL (allowance)" if hardware.kind == "gpu" else "framework (measured allowance)",
                 lambda e: human_bytes(e.memory.framework)),
                ("held for the whole run", lambda e: human_bytes(e.memory.held)),
                ("forward/backward: activations", lambda e: human_bytes(e.memory.activations)),
                ("  one layer, no checkpointing", lambda e: human_bytes(e.memory.activations_per_layer)),
                ("  MoE dispatch", lambda e: human_bytes(e.memory.dispatch)),
                ("  LM head (logits, log-softmax, grads)", lambda e: human_bytes(e.memory.lm_head)),
                ("optimizer step: gradients", lambda e: human_bytes(e.memory.gradients)),
                ("  + the step's temporaries", lambda e: human_bytes(e.memory.step_temporaries)),
                ("peak: held + the larger working set", lambda e: human_bytes(e.memory.total)),
                ("device memory", lambda e: human_bytes(e.device_memory)),
                ("fits", lambda e: "yes" if e.fits else "NO"),
                ("tokens per step", lambda e: f"{e.compute.tokens_per_step:,}"),
                ("FLOPs per token", lambda e: f"{e.compute.flops_per_token:.3g}"),
                ("FLOPs per step", lambda e: f"{e.compute.flops_per_step:.3g}"),
                (f"step time at MFU {hardware.mfu:.2f}", lambda e: _duration(e.compute.step_seconds)),
                ("stage time", lambda e: f"{_duration(e.compute.stage_seconds)} ({e.compute.steps:,} steps)")]
        if hardware.kind == "cpu":
            rows = [r for r in rows if not r[0].startswith(("tokens", "FLOPs", "step time", "stage time"))]
        lines.append(f"  {'per GPU' if hardware.kind == 'gpu' else 'per process':40} {'stage 1':>26} {'stage 2':>26}")
        for label, value in rows:
            lines.append(f"  {label:40} " + " ".join(f"{value(e):>26}" for e in pair))
        for e in (e for e in pair if not e.fits):
            lines.append(f"  WARNING: round {expansion.round_name} stage {e.setup.training_stage} needs "
                         f"{human_bytes(e.memory.total)} per GPU, more than {human_bytes(e.device_memory)}; "
                         f"changes that fit (estimated total per GPU):")
            lines += [f"    - {s}" for s in e.suggestions]
    return "\n".join(lines)


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB``, ``512MiB``, ``1e9`` -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    number = text.strip().upper().rstrip("S")
    unit = "".join(c for c in number if c.isalpha())
    try:
        value = float(number[: len(number) - len(unit)] if unit else number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise LayerMoEError(f"cannot read {text!r} as a memory size (e.g. 80GiB, 40GB)")
    return int(value * units[unit])


def model_config_path(config: RunConfig, given: str | None) -> Path:
    """The model the plan reads the config.json of: ``given`` (a directory or the file), else ``model.path``."""
    return Path(given).expanduser() if given else resolve_model_path(config.model, config.cache_path)
