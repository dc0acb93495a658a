"""Typed run configuration: YAML file + dotted command-line overrides, validated up front.

One ``RunConfig`` describes a whole lifelong expansion: the base model, the languages it already knows,
the expansion rounds (each a named group of new languages), where each language's text comes from, and
the settings of every stage. Every error names the offending field, e.g. ``analyze.batch_size``.

Result settings and run settings. Every field decides what a stage produces (a *result setting*: part of
the stage's fingerprint, so changing it re-runs the stage and starts its training checkpoints over) unless
it is declared with :func:`run_setting`: how a run is logged, tracked, checkpointed or laid out over
processes, which never changes a result. :func:`result_settings` is a settings object without its run
settings; the stage fingerprints (``pipeline/manifest.py``) and the training checkpoints' fingerprint are made
from it. A new field is a result setting unless it is declared a run setting.
"""

from __future__ import annotations

import dataclasses
import math
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import LayerMoEError
from pipeline.libreoffice_corpus import SUPPORTED_LANGUAGES


class ConfigError(LayerMoEError):
    """The configuration is invalid; the message starts with the field's dotted path."""


TrainingStage = Literal[1, 2]  # training stage 1 (new experts + routers) or 2 (routers + classifiers)

RUN_SETTING = "run_setting"  # dataclass field metadata key, see run_setting()


def run_setting(default: Any) -> Any:
    """A field that does not decide any result (logging, tracking, checkpoint cadence, layout): left out of
    stage and checkpoint fingerprints, so changing it re-runs nothing and keeps training checkpoints. A dataclass
    type as ``default`` makes a fresh instance per config."""
    if isinstance(default, type):
        return field(default_factory=default, metadata={RUN_SETTING: True})
    return field(default=default, metadata={RUN_SETTING: True})


def default_cache_dir() -> Path:
    """Where built artifacts shared between runs live (converted model, corpora): $LAYERMOE_CACHE or ~/.cache/layermoe."""
    return Path(os.path.expanduser(os.environ.get("LAYERMOE_CACHE", "~/.cache/layermoe")))


# ----------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The dense base model: ``default`` (built-in SmolLM2-135M-Instruct, de-quantised offline from its Q4_1 GGUF)
    or a local HF directory."""

    path: str = "default"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class SourceConfig:
    """One language's local corpus. ``format: auto`` infers it from the file extension."""

    path: str
    format: Literal["auto", "jsonl", "text", "parquet", "dataset"] = "auto"
    field: str = "text"
    text_sample_by: Literal["line", "paragraph", "document"] = "paragraph"


@dataclass
class DataConfig:
    """Where each language's text comes from, and how it is split into train and held-out parts; where the
    out-of-domain evaluation text of a language comes from (never trained on)."""

    builtin_corpus: Literal["libreoffice", "none"] = "libreoffice"
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    heldout_fraction: float = 0.05
    split_seed: int = 0
    ood_sources: dict[str, SourceConfig] = field(default_factory=dict)  # out-of-domain evaluation text per language
    # built-in out-of-domain text for the old languages it covers (Debian's debian-reference manual);
    # auto = debian-reference when builtin_corpus is on, none otherwise
    builtin_ood: Literal["auto", "debian-reference", "none"] = "auto"
    tokenize_workers: int | None = None  # processes that tokenize per rank; default: this rank's share of the cores


@dataclass
class RoundConfig:
    """One expansion round: a named group of new languages."""

    name: str
    languages: list[str]
    allocate: AllocateConfig | None = None  # replaces the run-wide allocate settings for this round


@dataclass
class AnalyzeConfig:
    """Layer-wise similarity of FFN inputs (docs/method.md, 3.1)."""

    tokens_per_language: int = 100_000
    max_length: int = 1024  # longer documents are cut into chunks of this many tokens
    batch_size: int = 8  # 1 = every chunk forwarded alone (the reference); >1 = right-padded batches
    include_special_tokens: bool = False  # whether BOS/EOS/other special tokens count


@dataclass
class AllocateConfig:
    """How similarity becomes experts per layer, and which layers get a routing classifier (docs/method.md, 3.2-3.3)."""

    method: Literal["reference", "budget", "uniform", "explicit"] = "reference"
    delta: float | None = None  # reference: N_i = ceil(delta * (1/S_i) / sum_j 1/S_j)
    budget: int | None = None  # budget: total NEW experts over all layers
    experts_per_layer: int | None = None  # uniform: total experts per layer incl. the original
    explicit: list[int] | None = None  # explicit: total experts per layer incl. the original
    aggregation: Literal["nn_no_mean", "new_new", "new_old", "all_pairs"] = "nn_no_mean"
    min_new_experts: int = 1  # budget: new experts every layer gets at least (0: a layer may stay dense)
    classifier_count: int = 7  # the K highest-similarity layers get a classifier ...
    classifier_layers: list[int] | None = None  # ... unless listed explicitly


@dataclass
class UpcycleConfig:
    """Turning the round's input model into an MoE model (docs/method.md, 2, 3.3 and 3.5)."""

    top_k: int = 2
    pooling: Literal["prefix", "sequence"] = "prefix"  # what the routing classifier sees
    keep_router_rows: bool = False  # growth: keep the trained router rows of existing experts (reference: re-init)
    verify_tolerance: float = 1e-3  # first round: max |logit difference| allowed between dense and upcycled model


@dataclass
class StageTrainConfig:
    """One training stage's schedule and data."""

    steps: int = 100  # optimizer steps
    lr: float = 5e-5
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    micro_batch_size: int = 4  # sequences per rank per micro-step
    gradient_accumulation: int = 1
    block_length: int = 256  # packed sequence length
    tokens_per_language: int = 200_000  # new-language text per language
    replay_tokens_per_language: int = 0  # stage 2: text per earlier language (old + earlier rounds)


@dataclass
class LoraSettings:
    """The LoRA baseline (``expansion: lora``, peft): adapters on the base model's linear layers, merged at export."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # peft names; all-linear = every linear but the LM head


@dataclass
class TrackingConfig:
    """Where training metrics go besides ``metrics.jsonl`` and the log: a run setting, not a result setting
    (changing it never re-runs a stage or discards its checkpoints)."""

    tensorboard: bool = False  # event files in <run_dir>/logs/tensorboard/ (pip install 'layermoe[tracking]')
    wandb: bool = False  # Weights & Biases (pip install wandb)
    wandb_project: str | None = None  # default: the run's name
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: files under <run_dir>/logs/wandb, no network


@dataclass
class TrainConfig:
    """Both training stages (docs/method.md, 2 and 3.4): DeepSpeed settings, loss weights and forms, logging,
    checkpoints.

    ``ep_size``, ``loss_chunk_tokens``, ``activation_checkpointing``, ``checkpoint_every``, ``stats_every`` and
    ``tracking`` are run settings (see the module docstring): a layout, memory choices that change only the
    order of floating-point sums, cadences, tracking; logging and tracking fields added here must be declared with
    :func:`run_setting` too."""

    ds_config: str = "ds_configs/cpu_fp32.json"
    ep_size: int = run_setting(1)  # expert-parallel group size: a layout; checkpoints move between layouts
    loss_chunk_tokens: int = run_setting(1024)  # LM-head cross-entropy this many positions at a time (0: all at once)
    # keep only each decoder layer's input and recompute the layer in the backward
    activation_checkpointing: bool = run_setting(False)
    alpha: float = 0.01  # stage 1 load-balance weight
    gamma: float = 0.1  # stage 2 LPR weight
    beta: float = 0.1  # stage 2 classifier weight
    # reference: the authors' per-slot sum (k for uniform routing); normalized: divided by k (1.0 for uniform routing)
    balance_form: Literal["reference", "normalized"] = "reference"
    lpr_form: Literal["paper", "double_softmax"] = "paper"
    lpr_reduction: Literal["layers", "expert_groups"] = "layers"  # expert_groups: LayerMoE as reported
    classifier_label: Literal["token", "sequence"] = "token"  # sequence: label of the first token, mean over sequences
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_clipping: float = 1.0
    weight_decay: float = 0.0
    checkpoint_every: int = run_setting(0)  # optimizer steps between DeepSpeed checkpoints; 0 = only at the end
    stats_every: int = run_setting(10)  # steps between routing-statistics reports
    tracking: TrackingConfig = run_setting(TrackingConfig)  # TensorBoard, W&B
    stage1: StageTrainConfig = field(default_factory=StageTrainConfig)
    stage2: StageTrainConfig = field(default_factory=lambda: StageTrainConfig(
        steps=30, tokens_per_language=50_000, replay_tokens_per_language=25_000))

    def for_stage(self, training_stage: TrainingStage) -> StageTrainConfig:
        """The schedule and data settings of training stage 1 or 2."""
        return self.stage1 if training_stage == 1 else self.stage2


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks scored for every model (pip install 'layermoe[harness]'). Nothing is
    downloaded: a task's data must be local (a task YAML in ``include_path`` may read a jsonl file)."""

    tasks: list[str] = field(default_factory=list)  # task or group names; an unknown one is an error
    num_fewshot: int | None = None  # None: each task's own default
    limit: float | None = None  # per task: >= 1 examples, < 1 a fraction of them; None: all
    batch_size: int = 8
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    include_path: str | None = None  # a directory of extra task YAMLs


@dataclass
class EvaluateConfig:
    """What the evaluate stage measures (held-out perplexity, routing, translation, harness tasks)."""

    tokens_per_language: int = 20_000  # held-out tokens scored per language
    block_length: int = 512
    batch_size: int = 4
    include_stage1_models: bool = True  # also score each round's stage-1 model (shows what stage 2 changes)
    translation_sentences: int = 8  # 0 disables the few-shot translation test
    translation_shots: int = 2
    translation_max_new_tokens: int = 48
    parallel_file: str | None = None  # jsonl with {"en": ..., "<lang>": ...}; default: the built-in corpus's set
    harness: HarnessConfig = field(default_factory=HarnessConfig)  # lm-evaluation-harness tasks
    cache_dir: str | None = None  # scored results (keyed by model content); default: <run_dir>/.evaluate_cache


@dataclass
class ExportConfig:
    """The export stage: each round's final model as a directory to share (weights, tokenizer, model card)."""

    dtype: Literal["float32", "bfloat16"] = "float32"  # the weights' type in the shared copy


@dataclass
class LaunchConfig:
    """How ``layermoe run`` starts the stages that split work over ranks (tokenize, analyze, training, evaluate)."""

    processes_per_node: int = 1  # > 1: those stages run under the DeepSpeed launcher with this many processes
    require_gpus: bool = False  # refuse to start (Slurm preflight) on a node without GPUs


Expansion = Literal["moe", "dense_full", "dense_ffn", "lora"]
Recipe = Literal["project", "reference"]

# The settings a recipe presets (docs/method.md, 4). ``reference`` reproduces the authors' code; ``project`` is
# this project's defaults. Applied to fields the YAML and the command line leave unset.
RECIPES: dict[str, dict[str, Any]] = {
    "reference": {"train.balance_form": "reference", "train.lpr_form": "double_softmax",
                  "train.lpr_reduction": "expert_groups", "train.classifier_label": "sequence",
                  "upcycle.pooling": "sequence"},
    "project": {"train.balance_form": "reference", "train.lpr_form": "paper", "train.lpr_reduction": "layers",
                "train.classifier_label": "token", "upcycle.pooling": "prefix"},
}


@dataclass
class RunConfig:
    """A whole lifelong expansion run."""

    name: str
    old_languages: list[str]
    rounds: list[RoundConfig]
    run_dir: str = "runs/{name}"
    cache_dir: str | None = None  # default: $LAYERMOE_CACHE, else ~/.cache/layermoe
    seed: int = 0
    recipe: Recipe = "project"  # presets of the loss forms and pooling (RECIPES); explicit fields win
    # moe: LayerMoE / MoE-LPR (analyze, allocate, upcycle, train); dense_full | dense_ffn | lora: baselines that
    # train the dense model itself (all weights, the FFNs only, or LoRA adapters) with the same data and schedule
    expansion: Expansion = "moe"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    allocate: AllocateConfig = field(default_factory=AllocateConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    # -- derived values ----------------------------------------------------------------------------------
    @property
    def run_path(self) -> Path:
        return Path(os.path.expanduser(self.run_dir.format(name=self.name)))

    @property
    def cache_path(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir)) if self.cache_dir else default_cache_dir()

    def round_index(self, name: str) -> int:
        for i, r in enumerate(self.rounds):
            if r.name == name:
                return i
        raise ConfigError(f"--round: unknown round {name!r}; rounds are {[r.name for r in self.rounds]}")

    def languages_before(self, round_index: int) -> list[str]:
        """Languages the model knows when round ``round_index`` starts: the old ones plus earlier rounds'."""
        known = list(self.old_languages)
        for r in self.rounds[:round_index]:
            known += r.languages
        return known

    def allocate_for(self, round_index: int) -> AllocateConfig:
        return self.rounds[round_index].allocate or self.allocate

    def all_languages(self) -> list[str]:
        return self.languages_before(len(self.rounds))


# ----------------------------------------------------------------------------------------------------------
# Building typed objects from plain data, with errors that name the field
# ----------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {non_none}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys, missing fields and wrong types are errors."""
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field; valid fields here are {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required field is missing")
    return cls(**kwargs)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``dotted.path=value`` override to raw config data; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected KEY=VALUE, e.g. analyze.batch_size=4")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {assignment!r}: empty key component")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, here)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{here}: cannot override inside a {type(node).__name__}")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where}: {part!r} is not an index of a list of length {len(node)}")
    return int(part)


# ----------------------------------------------------------------------------------------------------------
# Semantic validation
# ----------------------------------------------------------------------------------------------------------


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{where}: {message}")


def _require_positive(value: float, where: str) -> None:
    _require(math.isfinite(value) and value > 0, where, f"must be a finite number > 0, got {value}")


def _require_non_negative(value: float, where: str) -> None:
    _require(math.isfinite(value) and value >= 0, where, f"must be a finite number >= 0, got {value}")


def _require_at_least(value: int, minimum: int, where: str) -> None:
    _require(value >= minimum, where, f"must be >= {minimum}, got {value}")


def validate_allocate(a: AllocateConfig, where: str, top_k: int | None = None) -> None:
    """Check allocate settings (``where`` names them in errors, e.g. ``allocate`` or ``rounds[1].allocate``).
    ``top_k``: checked against a fixed allocation when ``a`` allocates the first round (later rounds add to the
    experts a layer has), else None."""
    needs = {"reference": "delta", "budget": "budget", "uniform": "experts_per_layer", "explicit": "explicit"}
    _require(getattr(a, needs[a.method]) is not None, f"{where}.{needs[a.method]}",
             f"required when {where}.method is {a.method!r}")
    if a.delta is not None:
        _require_positive(a.delta, f"{where}.delta")
    if a.budget is not None:
        _require_at_least(a.budget, 1, f"{where}.budget")
    if a.experts_per_layer is not None:
        _require(a.experts_per_layer >= 1, f"{where}.experts_per_layer", "must be >= 1 (the original expert)")
    if a.explicit is not None:
        _require(all(n >= 1 for n in a.explicit), f"{where}.explicit", "every layer needs >= 1 expert")
    _require_at_least(a.classifier_count, 0, f"{where}.classifier_count")
    _require_at_least(a.min_new_experts, 0, f"{where}.min_new_experts")
    if a.classifier_layers is not None:
        _require(all(i >= 0 for i in a.classifier_layers), f"{where}.classifier_layers", "layer indices must be >= 0")
    fixed = {"uniform": [a.experts_per_layer], "explicit": a.explicit}.get(a.method)
    if fixed and top_k is not None:
        check_top_k(top_k, fixed, f"{where}.{needs[a.method]}")


def check_top_k(top_k: int, experts_per_layer: list[int], source: str) -> None:
    """``upcycle.top_k`` must not exceed every layer's expert count (a router picks k of a layer's experts)."""
    most = max(experts_per_layer)
    if top_k > most:
        raise ConfigError(f"upcycle.top_k: {top_k} is larger than every layer's expert count (at most {most} in "
                          f"{source}); lower upcycle.top_k or allocate more experts")


def known_languages(config: RunConfig) -> set[str]:
    """Languages that have a text source: configured sources plus, if enabled, the built-in corpus."""
    known = set(config.data.sources)
    if config.data.builtin_corpus == "libreoffice":
        known |= set(SUPPORTED_LANGUAGES)
    return known


def validate(config: RunConfig) -> RunConfig:
    """Check everything that can be checked without touching files; return the config."""
    _require(bool(config.name.strip()), "name", "must not be empty")
    _require(len(config.old_languages) > 0, "old_languages", "at least one language the base model knows")
    _require(len(config.rounds) > 0, "rounds", "at least one expansion round")
    _require(0 <= config.seed < 2**63, "seed", f"must be in [0, 2^63), got {config.seed}")
    known = known_languages(config)
    seen: dict[str, str] = {}
    groups = [("old_languages", config.old_languages)] + [
        (f"rounds[{i}].languages", r.languages) for i, r in enumerate(config.rounds)
    ]
    round_names = set()
    top_k = config.upcycle.top_k
    for i, r in enumerate(config.rounds):
        _require(r.name not in round_names, f"rounds[{i}].name", f"duplicate round name {r.name!r}")
        _require(r.name.replace("-", "").replace("_", "").isalnum(), f"rounds[{i}].name",
                 f"{r.name!r}: use letters, digits, '-' and '_' only (it names a directory)")
        round_names.add(r.name)
        _require(len(r.languages) > 0, f"rounds[{i}].languages", "a round needs at least one new language")
        if r.allocate is not None:
            validate_allocate(r.allocate, f"rounds[{i}].allocate", top_k if i == 0 else None)
    for where, langs in groups:
        for lang in langs:
            _require(lang in known, where,
                     f"unknown language {lang!r}: no data.sources entry"
                     + (" and not in the built-in corpus" if config.data.builtin_corpus != "none" else "")
                     + f"; known: {sorted(known)}")
            _require(lang not in seen, where, f"language {lang!r} already appears in {seen.get(lang)}")
            seen[lang] = where
    _require(0 < config.data.heldout_fraction < 1, "data.heldout_fraction", "must be in (0, 1)")
    _require(config.data.tokenize_workers is None or config.data.tokenize_workers >= 1, "data.tokenize_workers",
             "must be >= 1 (or null: this rank's share of the cores)")
    a = config.analyze
    _require(a.tokens_per_language > 0, "analyze.tokens_per_language", "must be positive")
    _require(a.max_length >= 2, "analyze.max_length", "must be >= 2")
    _require(a.batch_size >= 1, "analyze.batch_size", "must be >= 1")
    _require_at_least(top_k, 1, "upcycle.top_k")
    validate_allocate(config.allocate, "allocate", top_k if config.rounds[0].allocate is None else None)
    _require_positive(config.upcycle.verify_tolerance, "upcycle.verify_tolerance")
    _require(config.launch.processes_per_node >= 1, "launch.processes_per_node", "must be >= 1")
    ev = config.evaluate
    _require(ev.tokens_per_language >= ev.block_length >= 8, "evaluate.tokens_per_language",
             "must be >= evaluate.block_length >= 8")
    _require(ev.batch_size >= 1, "evaluate.batch_size", "must be >= 1")
    _require_at_least(ev.translation_sentences, 0, "evaluate.translation_sentences")
    _require_at_least(ev.translation_shots, 0, "evaluate.translation_shots")
    _require_at_least(ev.translation_max_new_tokens, 1, "evaluate.translation_max_new_tokens")
    harness = ev.harness
    _require(harness.num_fewshot is None or harness.num_fewshot >= 0, "evaluate.harness.num_fewshot", "must be >= 0")
    _require(harness.limit is None or harness.limit > 0, "evaluate.harness.limit", "must be positive")
    _require(harness.batch_size >= 1, "evaluate.harness.batch_size", "must be >= 1")
    t = config.train
    _require(t.ep_size >= 1, "train.ep_size", "must be >= 1")
    _require(t.ep_size == 1 or config.expansion == "moe", "train.ep_size",
             f"expert parallelism needs experts; expansion {config.expansion!r} trains a dense model (use 1)")
    _require(t.lora.rank >= 1, "train.lora.rank", "must be >= 1")
    _require(0 <= t.lora.dropout < 1, "train.lora.dropout", "must be in [0, 1)")
    _require(bool(t.lora.target_modules), "train.lora.target_modules", "must name at least one module")
    _require(t.loss_chunk_tokens >= 0, "train.loss_chunk_tokens", "must be >= 0 (0: no chunking)")
    for name in ("alpha", "gamma", "beta", "gradient_clipping", "weight_decay"):
        _require_non_negative(getattr(t, name), f"train.{name}")
    _require_at_least(t.checkpoint_every, 0, "train.checkpoint_every")
    _require_at_least(t.stats_every, 1, "train.stats_every")
    _require_packages(config)
    for name in ("stage1", "stage2"):
        st: StageTrainConfig = getattr(t, name)
        for key in ("steps", "micro_batch_size", "gradient_accumulation", "tokens_per_language"):
            _require(getattr(st, key) >= 1, f"train.{name}.{key}", "must be >= 1")
        _require(st.block_length >= 8, f"train.{name}.block_length", "must be >= 8")
        _require_positive(st.lr, f"train.{name}.lr")
        _require(0 <= st.warmup_steps <= st.steps, f"train.{name}.warmup_steps", "must be in [0, steps]")
        _require(0 <= st.min_lr_ratio <= 1, f"train.{name}.min_lr_ratio", "must be in [0, 1]")
        _require_at_least(st.replay_tokens_per_language, 0, f"train.{name}.replay_tokens_per_language")
    return config


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # sys.modules[module] is None: deliberately hidden
        return False


def _require_packages(config: RunConfig) -> None:
    """Optional packages the config asks for (extras of this package) must be installed before any work."""
    tracking = config.train.tracking
    for wanted, module, where, how in (
            (tracking.tensorboard, "tensorboard", "train.tracking.tensorboard", "pip install 'layermoe[tracking]'"),
            (tracking.wandb, "wandb", "train.tracking.wandb", "pip install wandb"),
            (bool(config.evaluate.harness.tasks), "lm_eval", "evaluate.harness.tasks", "pip install 'layermoe[harness]'")):
        _require(not wanted or installed(module), where, f"needs the {module} package, which is not installed ({how})")


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config, apply ``key=value`` overrides, build and validate a ``RunConfig``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: the top level must be a mapping")
    for assignment in overrides:
        apply_override(data, assignment)
    apply_recipe(data)
    return validate(from_dict(RunConfig, data))


def apply_recipe(data: dict) -> None:
    """Fill the settings of ``data["recipe"]`` (``RECIPES``; default ``project``) that the raw config data does
    not set itself, so that the YAML and ``key=value`` overrides still win over the preset."""
    recipe = data.get("recipe", "project")
    preset = RECIPES.get(recipe) if isinstance(recipe, str) else None
    if preset is None:
        return  # an unknown recipe is reported by from_dict, naming the field
    for key, value in preset.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node.setdefault(last, value)


def result_settings(obj: Any) -> Any:
    """Plain-data form of a settings object without its run settings (see the module docstring), at every depth:
    what decides a result."""
    if dataclasses.is_dataclass(obj):
        return {f.name: result_settings(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get(RUN_SETTING)}
    if isinstance(obj, dict):
        return {k: result_settings(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [result_settings(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config or settings object (for manifests and the saved copy of the run's config):
    dataclasses become dicts, their paths strings; anything else is returned as it is."""
    if not dataclasses.is_dataclass(obj):
        return obj
    return dataclasses.asdict(obj, dict_factory=lambda fields: {k: str(v) if isinstance(v, Path) else v
                                                                for k, v in fields})
