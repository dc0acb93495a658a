"""The pipeline's stages: one table (:data:`STAGES`) and, for each stage, the function that runs it for a round.

Everything that lists stages reads the table: the run loop (``pipeline/runner.py``), the ``layermoe``
subcommands (``pipeline/cli.py``), the multi-process launch and the Slurm script (``pipeline/cluster.py``,
``slurm/expand.sh``). Adding a stage is one :class:`Stage` entry, its run function here, and its script in
``stages/``.

Each run function reads its inputs from earlier stages' directories (``pipeline/run_dir.py``) and writes its
own through ``pipeline.manifest.run_stage``: atomically, with a manifest, skipped when up to date. The
manifest's config slice is made from the same settings object the stage's body reads, so the two cannot
disagree::

    runs/<name>/<round>/tokenize/  stores.json (the round's token stores, kept in <cache>/tokens/), manifest.json
    runs/<name>/<round>/analyze/   similarity.json, similarity.png, manifest.json
    runs/<name>/<round>/allocate/  allocation.json, allocation.png, manifest.json
    runs/<name>/<round>/upcycle/   model/ (expanded HF directory), manifest.json
    runs/<name>/<round>/train_stage1/, train_stage2/   model/, metrics.jsonl, routing_stats.json, manifest.json
    runs/<name>/<round>/evaluate/  report.json, report.md, *.png, manifest.json
    runs/<name>/<round>/export/    model/ (the model to share: weights, tokenizer, README.md model card), manifest.json
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline import distributed, log
from pipeline.allocate import allocate, read_allocation, write_allocation
from pipeline.analyze import language_means
from pipeline.atomic import read_json, write_json, write_text
from pipeline.base_model import load_causal_lm, pick_device, read_model_config
from pipeline.checkpoint_dir import StageIdentity, prepare_checkpoint_dir, start_point
from pipeline.config import (AllocateConfig, AnalyzeConfig, EvaluateConfig, ExportConfig, RoundConfig, RunConfig,
                             TrainingStage, UpcycleConfig, check_top_k, result_settings)
from pipeline.corpus import LanguageSource, Split, ood_source, resolve_source
from pipeline.errors import LayerMoEError
from pipeline.eval_report import EvalReport, LanguageGroups, read_report
from pipeline.evaluate import EvalModel, evaluate_models, parameter_count
from pipeline.export import export_model, make_tokenizer_portable
from pipeline.hf_modeling.modeling_layermoe import LayerMoEForCausalLM
from pipeline.manifest import StageNotDone, StageSpec, checking_only, hash_path, run_stage
from pipeline.model_card import DEFAULT_BASE_MODEL, DEFAULT_BASE_MODEL_ID, CardFacts, TrainedStage, model_card
from pipeline.packing import load_tokenizer
from pipeline.plan import format_plan, plan
from pipeline.plots import plot_loss_curves, plot_perplexity, plot_routing_heatmap, plot_similarity, words
from pipeline.report import write_report_md
from pipeline.run_dir import round_input_model, stage_dir, stores_file, trained_model_dir
from pipeline.similarity import Similarity, group_similarities, layer_scores, pairwise_similarities, read_similarity
from pipeline.store_index import STORES_FILE, StoreEntry, StoreIndex
from pipeline.token_store import TOKENIZER_FILES, TokenStore, tokenizer_fingerprint
from pipeline.tokenize_corpus import language_stores
from pipeline.train import init_deepspeed_distributed, train_stage, training_settings
from pipeline.training_data import stage_languages
from pipeline.training_metrics import METRICS_FILE, ROUTING_FILE, loss_weights, read_metrics
from pipeline.upcycle import ExpansionRound, grow, upcycle

STAGES_DIR = Path(__file__).resolve().parents[1] / "stages"


@dataclass(frozen=True)
class StageOptions:
    """How a command asks a stage to run: ``force`` re-runs it even when it is done; ``resume_from`` (training
    stages) starts it from that checkpoint, an explicit choice (see ``pipeline/checkpoint_dir.py``)."""

    force: bool = False
    resume_from: Path | None = None


def _spec(config: RunConfig, round_index: int, stage: str, settings: Any, inputs: dict[str, Path],
          hashed: dict[str, str] | None = None) -> StageSpec:
    """Stage ``stage`` of a round, with ``settings`` (a dataclass, or a dict) as the manifest's config slice: its
    result settings (``pipeline.config.result_settings``), so that a run setting in it never re-runs the stage."""
    return StageSpec(stage=stage, round_name=config.rounds[round_index].name,
                     out_dir=stage_dir(config, round_index, stage), config_slice=result_settings(settings),
                     inputs=inputs, hashed=hashed or {})


def _run(config: RunConfig, round_index: int, stage: str, settings: Any, inputs: dict[str, Path],
         body: Callable[[Path | None], dict], options: StageOptions, hashed: dict[str, str] | None = None) -> Path:
    """Run ``body`` as stage ``stage`` of a round (see ``pipeline.manifest.run_stage``); ``hashed``: hashes of
    inputs computed already."""
    return run_stage(_spec(config, round_index, stage, settings, inputs, hashed), body, options.force)


def _stores_input(config: RunConfig, round_index: int, stage: str) -> Path:
    """The round's ``stores.json`` (a stage's manifest input instead of the corpora); an error if it is missing."""
    path = stores_file(config, round_index)
    if not path.is_file():
        raise LayerMoEError(f"{config.rounds[round_index].name}/{stage}: {path} does not exist; run the tokenize "
                            f"stage first (layermoe tokenize CONFIG)")
    return path


def _skipped_for_dense(config: RunConfig, round_index: int, stage: str) -> Path | None:
    """For a dense baseline (``expansion`` other than moe) the stages that build the MoE model do not apply: log
    that and return the (absent) stage directory; None for the MoE expansion."""
    if config.expansion == "moe":
        return None
    log.info(f"{config.rounds[round_index].name}/{stage}: skipped (expansion {config.expansion} trains the dense model)")
    return stage_dir(config, round_index, stage)


@dataclass(frozen=True)
class HeldoutSplit:
    """How documents are split into train and held-out parts (``data.heldout_fraction``, ``data.split_seed``)."""

    heldout_fraction: float
    seed: int


# ----------------------------------------------------------------------------------------------------------
# tokenize
# ----------------------------------------------------------------------------------------------------------

SPLITS: tuple[Split, ...] = ("train", "heldout")


@dataclass(frozen=True)
class TokenizeSettings:
    """What decides a round's stores.json (besides its inputs: the corpora and the tokenizer files). The number of
    worker processes does not: the stores are the same bytes however they were made."""

    sources: dict[str, LanguageSource]
    split: HeldoutSplit


def run_tokenize(config: RunConfig, round_index: int, options: StageOptions) -> Path:
    """tokenize: every (language, split) the round's later stages read (train and held-out split of every language
    so far) into token stores with the round's input model's tokenizer (stores already in the cache, from another
    round or run, are not tokenized again); stores.json lists them."""
    model_path = round_input_model(config, round_index)
    languages = config.languages_before(round_index + 1)
    sources = {lang: resolve_source(config, lang) for lang in languages}
    settings = TokenizeSettings(sources, HeldoutSplit(config.data.heldout_fraction, config.data.split_seed))
    corpus_hashes = {lang: hash_path(source.path) for lang, source in sources.items()}  # once: manifest and store keys
    inputs = {**{f"corpus:{lang}": source.path for lang, source in sources.items()},
              **{f"tokenizer:{name}": model_path / name for name in TOKENIZER_FILES if (model_path / name).is_file()}}
    listed = stores_file(config, round_index)
    if listed.is_file() and not options.force and _listed_store_missing(listed):
        log.info(f"{config.rounds[round_index].name}/tokenize: a store listed in {listed} is gone; tokenizing again")
        options = replace(options, force=True)
    body = functools.partial(_tokenize, config, round_index, model_path, sources, corpus_hashes)
    return _run(config, round_index, "tokenize", settings, inputs, body, options,
                hashed={f"corpus:{lang}": h for lang, h in corpus_hashes.items()})


def _listed_store_missing(path: Path) -> bool:
    """Whether a store that ``stores.json`` lists is gone (e.g. the cache was cleared), or the list is unreadable."""
    try:
        return any(not entry.path.is_dir() for entry in StoreIndex.load(path).entries)
    except LayerMoEError:
        return True


def _tokenize(config: RunConfig, round_index: int, model_path: Path, sources: dict[str, LanguageSource],
              corpus_hashes: dict[str, str], out: Path | None) -> dict:
    stores = language_stores(config, {lang: SPLITS for lang in sources}, model_path, corpus_hashes)
    _check_enough_text(config, round_index, sources, stores)
    index = StoreIndex(tokenizer_fingerprint(model_path),
                       tuple(StoreEntry.of(lang, split, store) for (lang, split), store in stores.items()))
    if out is not None:
        index.write(out / STORES_FILE)
    tokens = sum(entry.tokens for entry in index.entries)
    log.info(f"tokenize {config.rounds[round_index].name}: {len(index.entries)} stores, {tokens:,} tokens")
    return {"stores": len(index.entries), "tokens": tokens}


def _check_enough_text(config: RunConfig, round_index: int, sources: dict[str, LanguageSource],
                       stores: dict[tuple[str, Split], TokenStore]) -> None:
    """Every store holds at least one block of each stage that reads it (training: train split; evaluate:
    held-out split), so a too-small corpus stops the run here, not after hours of earlier stages."""
    needs: list[tuple[str, Split, int, str]] = []
    for stage in (1, 2):
        block = config.train.for_stage(stage).block_length
        needs += [(lang, "train", block, f"train.stage{stage}.block_length")
                  for lang in stage_languages(config, round_index, stage)[0]]
    needs += [(lang, "heldout", config.evaluate.block_length, "evaluate.block_length")
              for lang in config.languages_before(round_index + 1)]
    for lang, split, block, setting in needs:
        store = stores[(lang, split)]
        if store.num_tokens < block:
            raise LayerMoEError(f"language {lang!r}: corpus {str(sources[lang].path)!r} is too small: its {split} split "
                                f"has {store.num_tokens:,} tokens, fewer than one block of {setting}={block}")


# ----------------------------------------------------------------------------------------------------------
# analyze
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalyzeSettings:
    """What decides a round's similarity.json (besides its inputs: the model and the round's stores.json)."""

    analyze: AnalyzeConfig
    old: list[str]
    new: list[str]
    model_dtype: str


def run_analyze(config: RunConfig, round_index: int, options: StageOptions) -> Path:
    """analyze: similarity.json + similarity.png for one round, from the train-split stores of its languages."""
    if (skipped := _skipped_for_dense(config, round_index, "analyze")) is not None:
        return skipped
    old, new = config.languages_before(round_index), list(config.rounds[round_index].languages)
    model_path = round_input_model(config, round_index)
    stores = _stores_input(config, round_index, "analyze")
    settings = AnalyzeSettings(config.analyze, old, new, config.model.dtype)
    body = functools.partial(_analyze, settings, config.rounds[round_index].name, model_path, stores,
                             config.model.device)
    return _run(config, round_index, "analyze", settings, {"model": model_path, "stores": stores}, body, options)


def _analyze(settings: AnalyzeSettings, round_name: str, model_path: Path, stores_path: Path, device: str,
             out: Path | None) -> dict:
    a, old, new = settings.analyze, settings.old, settings.new
    stores = StoreIndex.read(stores_path, model_path).open_all(old + new, "train")
    device = pick_device(device)
    log.info(f"analyze: loading {model_path} ({settings.model_dtype}, {device})")
    model = load_causal_lm(model_path, settings.model_dtype, device)
    means, counts = language_means(model, load_tokenizer(model_path), stores, a.tokens_per_language, a.max_length,
                                   a.batch_size, a.include_special_tokens)
    pairs = pairwise_similarities(means)
    sim = Similarity(old, new, len(next(iter(means.values()))), pairs, layer_scores(pairs, old, new, "nn_no_mean"),
                     "nn_no_mean")
    if out is not None:
        write_json(out / "similarity.json", sim.to_json(tokens=counts, model=str(model_path)))
        groups = {k: v for k, v in group_similarities(pairs, old, new).items() if k != "all_pairs"}
        plot_similarity(groups, sim.layer_scores, f"{round_name}: new languages {words(new)} vs old {words(old)}",
                        out / "similarity.png")
    lo, hi = min(sim.layer_scores), max(sim.layer_scores)
    log.info(f"analyze {round_name}: S ranges {lo:.4f}..{hi:.4f} over {sim.num_layers} layers "
             f"(lowest at layer {sim.layer_scores.index(lo)}, highest at layer {sim.layer_scores.index(hi)})")
    return {"tokens": counts, "num_layers": sim.num_layers}


# ----------------------------------------------------------------------------------------------------------
# allocate
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllocateSettings:
    """What decides a round's allocation.json (besides its inputs, similarity.json and the model's config)."""

    allocate: AllocateConfig


def run_allocate(config: RunConfig, round_index: int, options: StageOptions) -> Path:
    """allocate: allocation.json + allocation.png for one round, from that round's similarity.json."""
    if (skipped := _skipped_for_dense(config, round_index, "allocate")) is not None:
        return skipped
    settings = AllocateSettings(config.allocate_for(round_index))
    model_path = round_input_model(config, round_index)
    similarity_file = stage_dir(config, round_index, "analyze") / "similarity.json"
    if not similarity_file.is_file():
        raise LayerMoEError(f"allocate {config.rounds[round_index].name}: {similarity_file} does not exist; run the "
                            f"analyze stage first")
    body = functools.partial(_allocate, settings, config.rounds[round_index], model_path, similarity_file,
                             config.upcycle.top_k)
    return _run(config, round_index, "allocate", settings,
                {"similarity": similarity_file, "model_config": model_path / "config.json"}, body, options)


def _allocate(settings: AllocateSettings, rnd: RoundConfig, model_path: Path, similarity_file: Path, top_k: int,
              out: Path | None) -> dict:
    model_config = read_model_config(model_path)
    existing = model_config.get("experts_per_layer")  # an expanded model grows by this round's experts
    base_config = model_config["base_config"] if existing else model_config
    sim = read_similarity(similarity_file)
    scores = layer_scores(sim.pairs, sim.old, sim.new, settings.allocate.aggregation)
    result = allocate(settings.allocate, scores, base_config["num_hidden_layers"])
    totals = [e + n - 1 for e, n in zip(existing, result.experts_per_layer)] if existing else result.experts_per_layer
    check_top_k(model_config["num_experts_per_tok"] if existing else top_k, totals, f"the allocation of {rnd.name}")
    params = plan(base_config, totals, result.classifier_layers)
    log.info(f"allocate {rnd.name}: {result.method} -> experts per layer {result.experts_per_layer} "
             f"({sum(result.new_experts_per_layer)} new), classifier layers {result.classifier_layers}")
    log.info("parameter plan (top-2):\n" + format_plan(params))
    if out is not None:
        earlier = model_config.get("expert_rounds") or [[0]] * len(totals)
        round_names = [*(r["name"] for r in model_config.get("rounds", [])), rnd.name]
        write_allocation(out, result, settings.allocate, f"{rnd.name} ({words(rnd.languages)})", earlier, round_names,
                         round=rnd.name, new_languages=rnd.languages,
                         parameters={"total": params.total, "activated_top2": params.activated, "dense": params.dense_total})
    return {"total_new_experts": sum(result.new_experts_per_layer), "classifier_layers": result.classifier_layers}


# ----------------------------------------------------------------------------------------------------------
# upcycle
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpcycleSettings:
    """What decides a round's expanded model (besides its inputs, the round's input model and allocation.json)."""

    upcycle: UpcycleConfig
    seed: int
    model_dtype: str
    old_languages: list[str]


def verification_text(stores_path: Path, model_path: Path, languages: list[str], tokens: int = 96) -> torch.Tensor:
    """A short real sample for function-preservation checks: the start of the first train document of each
    language, as the model's tokenizer alone encodes it, from the stores ``stores_path`` lists."""
    stores = StoreIndex.read(stores_path, model_path)
    ids: list[int] = []
    for lang in languages:
        ids += stores.open(lang, "train").text_ids(0)[: tokens // len(languages)].tolist()
    return torch.tensor([ids])


def run_upcycle(config: RunConfig, round_index: int, options: StageOptions) -> Path:
    """upcycle: the round's input model + allocation.json -> the expanded model (first round: upcycle the dense
    model, checked to compute the same logits on a sample of the round's stores; later rounds: grow the previous
    round's model)."""
    if (skipped := _skipped_for_dense(config, round_index, "upcycle")) is not None:
        return skipped
    settings = UpcycleSettings(config.upcycle, config.seed, config.model.dtype, config.old_languages)
    model_path = round_input_model(config, round_index)
    allocation_file = stage_dir(config, round_index, "allocate") / "allocation.json"
    sample_languages = config.languages_before(round_index) + list(config.rounds[round_index].languages)
    verification = functools.partial(verification_text, stores_file(config, round_index), model_path, sample_languages)
    body = functools.partial(_upcycle, settings, config.rounds[round_index], model_path, allocation_file, verification)
    return _run(config, round_index, "upcycle", settings, {"model": model_path, "allocation": allocation_file},
                body, options)


def _upcycle(settings: UpcycleSettings, rnd: RoundConfig, model_path: Path, allocation_file: Path,
             verification: Callable[[], torch.Tensor], out: Path | None) -> dict:
    """Upcycle (dense input, checked on ``verification()``'s sample) or grow (expanded input).

    Both happen in float32, so the function-preservation check measures the upcycling itself, not the rounding
    of a bfloat16 expert mix (1e-1 logit differences on real models); the result is saved in ``model.dtype``
    (copies of bfloat16 weights are exact either way)."""
    u = settings.upcycle
    allocation = read_allocation(allocation_file)
    model = load_causal_lm(model_path, "float32", "cpu")
    expansion = ExpansionRound(rnd.name, list(rnd.languages), allocation.experts_per_layer,
                               allocation.classifier_layers)
    summary: dict = {"experts_per_layer": None}
    if isinstance(model, LayerMoEForCausalLM):
        log.info(f"upcycle {rnd.name}: growing {model_path} by {sum(allocation.new_experts_per_layer)} experts")
        check_top_k(model.config.num_experts_per_tok,
                    [e + n - 1 for e, n in zip(model.config.experts_per_layer, allocation.experts_per_layer)],
                    f"{allocation_file} grown onto {model_path}")
        expanded = grow(model, expansion, keep_router_rows=u.keep_router_rows, seed=settings.seed)
    else:
        check_top_k(u.top_k, allocation.experts_per_layer, str(allocation_file))
        log.info(f"upcycle {rnd.name}: {sum(allocation.new_experts_per_layer)} new experts, "
                 f"classifiers in layers {allocation.classifier_layers}")
        sample = verification()
        with torch.no_grad():
            dense_logits = model(sample).logits
        expanded = upcycle(model, expansion, settings.old_languages, u.top_k, u.pooling, settings.seed)
        with torch.no_grad():
            diff = (expanded(sample).logits - dense_logits).abs().max().item()
        log.info(f"upcycle {rnd.name}: max |logit difference| to the dense model = {diff:.2e} "
                 f"over {sample.shape[1]} tokens (tolerance {u.verify_tolerance})")
        if not diff <= u.verify_tolerance:
            raise LayerMoEError(f"upcycled model does not reproduce the dense model: max logit difference {diff:.3e} "
                                f"> upcycle.verify_tolerance {u.verify_tolerance}")
        summary["max_logit_difference"] = diff
    summary["experts_per_layer"] = expanded.config.experts_per_layer
    summary["classifier_layers"] = expanded.config.classifier_layers
    if out is not None:
        export_model(expanded.to(getattr(torch, settings.model_dtype)), out / "model", tokenizer_from=model_path)
    return summary


# ----------------------------------------------------------------------------------------------------------
# train_stage1, train_stage2
# ----------------------------------------------------------------------------------------------------------


def run_train(config: RunConfig, round_index: int, training_stage: TrainingStage, options: StageOptions) -> Path:
    """train_stage1 / train_stage2: train the previous stage's model, export the result as an HF directory. Stage 1
    starts from the upcycled model (a dense baseline: from the round's input model)."""
    name = f"train_stage{training_stage}"
    if training_stage == 1 and config.expansion != "moe":
        model_in = round_input_model(config, round_index)
    else:
        model_in = stage_dir(config, round_index, "upcycle" if training_stage == 1 else "train_stage1") / "model"
    if not model_in.is_dir():
        raise LayerMoEError(f"{config.rounds[round_index].name}/{name}: its input model {model_in} does not exist; "
                            f"run the {'upcycle' if training_stage == 1 else 'train_stage1'} stage first")
    settings = training_settings(config, round_index, training_stage)
    spec = _spec(config, round_index, name, settings, {"model": model_in, "stores": _stores_input(config, round_index, name)})
    checkpoints = stage_dir(config, round_index, f"{name}.checkpoints")
    body = functools.partial(_train, config, round_index, training_stage, spec, options.resume_from, model_in,
                             checkpoints)
    return run_stage(spec, body, options.force)


def run_train_stage1(config: RunConfig, round_index: int, options: StageOptions) -> Path:
    """train_stage1: this round's new experts and the routers, on the new languages."""
    return run_train(config, round_index, 1, options)


def run_train_stage2(config: RunConfig, round_index: int, options: StageOptions) -> Path:
    """train_stage2: routers and classifiers, on the new languages plus replay of the earlier ones."""
    return run_train(config, round_index, 2, options)


def _train(config: RunConfig, round_index: int, training_stage: TrainingStage, spec: StageSpec,
           resume_from: Path | None, model_in: Path, checkpoints: Path, out: Path | None) -> dict:
    """Train on every rank, from where the stage's checkpoint directory says (``pipeline/checkpoint_dir.py``)."""
    init_deepspeed_distributed()
    identity = StageIdentity(spec.label, spec.fingerprint, spec.config_slice, spec.input_hashes)
    error = None
    if distributed.current().is_main:  # only rank 0 prepares: the others would race with its writes
        try:
            prepare_checkpoint_dir(checkpoints, identity, resume_from)
        except Exception as e:
            error = e
    distributed.raise_if_failed_anywhere(error, f"preparing {checkpoints}")
    result = train_stage(config, round_index, training_stage, model_in, checkpoints, start_point(checkpoints),
                         out / "model" if out else None)
    if out is not None:
        for name in (METRICS_FILE, ROUTING_FILE):
            if (checkpoints / name).exists():
                shutil.copyfile(checkpoints / name, out / name)
    return {"steps": result.steps, "final_loss": result.final_loss, "tokens_per_second": result.tokens_per_second,
            "peak_memory_gib": result.peak_memory_gib, "memory_before_model_gib": result.memory_before_model_gib,
            "peak_memory_growth_gib": result.peak_memory_growth_gib,
            "trained_parameters": result.trained_parameters, "resumed_from": str(resume_from) if resume_from else None}


# ----------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluateSettings:
    """What decides a round's report (besides its inputs: the models and the round's stores.json)."""

    evaluate: EvaluateConfig
    languages: list[str]
    models: list[str]  # labels


def evaluated_models(config: RunConfig, round_index: int) -> list[EvalModel]:
    """The models a round's evaluation scores: the base model, then each round's (stage-1 and) final model."""
    models = [EvalModel("base", round_input_model(config, 0))]
    for q in range(round_index + 1):
        name = config.rounds[q].name
        if config.evaluate.include_stage1_models:
            models.append(EvalModel(f"{name}/stage1", stage_dir(config, q, "train_stage1") / "model"))
        models.append(EvalModel(name, trained_model_dir(config, q)))
    return models


def run_evaluate(config: RunConfig, round_index: int, options: StageOptions) -> Path:
    """evaluate: the base model and every model of the run up to this round, on every language so far."""
    models = evaluated_models(config, round_index)
    known = config.languages_before(round_index + 1)
    languages = LanguageGroups([l for l in known if l in config.old_languages],
                               [l for l in known if l not in config.old_languages])
    settings = EvaluateSettings(config.evaluate, languages.all, [m.label for m in models])
    stores = _stores_input(config, round_index, "evaluate")
    ood = {f"ood:{lang}": source.path for lang in languages.all if (source := ood_source(config, lang)) is not None}
    body = functools.partial(_evaluate, config, round_index, models, languages, stores)
    return _run(config, round_index, "evaluate", settings,
                {**{f"model:{m.label}": m.path for m in models}, "stores": stores, **ood}, body, options)


def _evaluate(config: RunConfig, round_index: int, models: list[EvalModel], languages: LanguageGroups,
              stores_path: Path, out: Path | None) -> dict:
    translate = {"base"} | {config.rounds[q].name for q in range(round_index + 1)}
    report = evaluate_models(config, models, languages, translate, config.rounds[round_index].name,
                             StoreIndex.read(stores_path, models[0].path))
    if out is not None:
        figures = _report_figures(config, round_index, report, out)
        write_json(out / "report.json", report.to_json())
        write_report_md(report, out / "report.md", figures)
    return {"group_average": report.to_json()["group_average"]}


def _report_figures(config: RunConfig, round_index: int, report: EvalReport, out: Path) -> list[tuple[str, str]]:
    """Plot the report's figures into ``out`` (perplexity, each round's training curves, routing heat maps) and
    copy in each round's similarity and allocation plots; ``(file name, caption)`` pairs."""
    figures = [("perplexity.png", "Held-out perplexity per language")]
    plot_perplexity(report, out / "perplexity.png")
    for q in range(round_index + 1):
        name = config.rounds[q].name
        files = [(n, stage_dir(config, q, f"train_stage{n}") / METRICS_FILE) for n in (1, 2)]
        stages = {n: records for n, path in files if path.is_file() and (records := read_metrics(path))}
        if stages:  # (none or one stage: a run trained before metrics.jsonl existed, or resumed at its last step)
            plot_loss_curves(stages, loss_weights(config), f"{name} ({words(config.rounds[q].languages)}): training "
                             f"losses", out / f"loss_{name}.png")
            figures.append((f"loss_{name}.png", f"Training losses of round {name}"))
    for label, results in report.models.items():
        if results.routing is not None:
            name = f"routing_{label.replace('/', '_')}.png"
            plot_routing_heatmap(results.routing, f"{label}: expert load per language on held-out text", out / name,
                                 config.upcycle.top_k)
            figures.append((name, f"Expert load of {label}"))
    for q in range(round_index + 1):
        for stage, png, caption in (("analyze", "similarity.png", "Layer-wise similarity"),
                                    ("allocate", "allocation.png", "Experts per layer")):
            source = stage_dir(config, q, stage) / png
            if source.exists():
                target = f"{config.rounds[q].name}_{png}"
                shutil.copyfile(source, out / target)
                figures.append((target, f"{caption}, round {config.rounds[q].name}"))
    return figures


# ----------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSettings:
    """What decides a round's shared copy of its model (besides its inputs: the trained model, the report)."""

    export: ExportConfig
    base_model: str
    data: dict[str, str]  # language -> where its text came from (stated in the model card)


def run_export(config: RunConfig, round_index: int, options: StageOptions) -> Path:
    """export: the round's final model as a directory to share: weights in ``export.dtype``, the modeling code, a
    tokenizer that needs no custom code (``AutoTokenizer``; on transformers 5 with ``trust_remote_code=False`` to
    avoid a question about the model's code), and a model card with the round's evaluation. (A dense baseline's
    models stay in its training stages' directories.)"""
    if (skipped := _skipped_for_dense(config, round_index, "export")) is not None:
        return skipped
    languages = config.languages_before(round_index + 1)
    data = {lang: _data_description(config, lang) for lang in languages}
    settings = ExportSettings(config.export, config.model.path, data)
    model_in = trained_model_dir(config, round_index)
    report_file = stage_dir(config, round_index, "evaluate") / "report.json"
    body = functools.partial(_export, config, round_index, settings, model_in, report_file)
    return _run(config, round_index, "export", settings, {"model": model_in, "report": report_file}, body, options)


def _data_description(config: RunConfig, language: str) -> str:
    source = config.data.sources.get(language)
    if source is not None:
        return f"{source.path} ({source.format})"
    return "Debian's LibreOffice help and UI translations (MPL-2.0), the built-in corpus"


def _export(config: RunConfig, round_index: int, settings: ExportSettings, model_in: Path, report_file: Path,
            out: Path | None) -> dict:
    model = load_causal_lm(model_in, settings.export.dtype, "cpu")
    model_config = model.config
    facts = CardFacts(
        run=config.name, round=config.rounds[round_index].name,
        base_model=DEFAULT_BASE_MODEL if settings.base_model == "default" else settings.base_model,
        base_model_id=DEFAULT_BASE_MODEL_ID if settings.base_model == "default" else None,
        original_languages=list(model_config.original_languages), rounds=list(model_config.rounds),
        experts_per_layer=list(model_config.experts_per_layer), expert_rounds=model_config.expert_rounds,
        classifier_layers=list(model_config.classifier_layers), top_k=model_config.num_experts_per_tok,
        parameters=parameter_count(model_in), activated_parameters=plan(
            model_config.base_config, model_config.experts_per_layer, model_config.classifier_layers,
            model_config.num_experts_per_tok).activated,
        dtype=settings.export.dtype, data=settings.data, training=_trained_stages(config, round_index),
        report=read_report(report_file))
    if out is not None:
        export_model(model, out / "model", tokenizer_from=model_in)
        make_tokenizer_portable(out / "model")
        write_text(out / "model" / "README.md", model_card(facts))
    log.info(f"export {facts.round}: {settings.export.dtype} weights, {facts.parameters / 1e6:,.1f}M parameters, "
             f"with a model card")
    return {"dtype": settings.export.dtype, "parameters": facts.parameters}


def _trained_stages(config: RunConfig, round_index: int) -> list[TrainedStage]:
    """Each training stage of the rounds so far, from its manifest and metrics.jsonl."""
    stages = []
    for q in range(round_index + 1):
        for training_stage in (1, 2):
            directory = stage_dir(config, q, f"train_stage{training_stage}")
            manifest = read_json(directory / "manifest.json", "training manifest")
            settings, summary = manifest["config"]["stage"], manifest["summary"]
            metrics = read_metrics(directory / METRICS_FILE) if (directory / METRICS_FILE).is_file() else []
            stages.append(TrainedStage(config.rounds[q].name, training_stage, summary["steps"],
                                       metrics[-1]["tokens"] if metrics else None, settings["lr"],
                                       settings["block_length"], summary["final_loss"].get("total")))
    return stages


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One pipeline stage."""

    name: str
    run: Callable[[RunConfig, int, StageOptions], Path]  # run(config, round_index, options) -> the stage directory
    splits_over_ranks: bool  # started in several processes, it splits its work over them
    help: str
    entry: tuple[str, ...]  # its script in stages/ and the script's fixed arguments
    resumable: bool = False  # it saves checkpoints, and can start from one (--resume-from)

    @property
    def entry_argv(self) -> list[str]:
        """The entry script's path and fixed arguments, as a command line starts it."""
        return [str(STAGES_DIR / self.entry[0]), *self.entry[1:]]


STAGES: tuple[Stage, ...] = (
    Stage("tokenize", run_tokenize, True, "every language's text -> token stores in the cache -> stores.json",
          ("tokenize_corpus.py",)),
    Stage("analyze", run_analyze, True, "layer-wise similarity of new vs old languages -> similarity.json",
          ("analyze.py",)),
    Stage("allocate", run_allocate, False, "similarity -> experts per layer and classifier layers -> allocation.json",
          ("allocate.py",)),
    Stage("upcycle", run_upcycle, False, "round's input model + allocation -> expanded MoE model (HF directory)",
          ("upcycle.py",)),
    Stage("train_stage1", run_train_stage1, True, "train new experts + routers on the new languages (DeepSpeed)",
          ("train.py", "--stage", "1"), resumable=True),
    Stage("train_stage2", run_train_stage2, True, "train routers + classifiers on new + replay text (DeepSpeed)",
          ("train.py", "--stage", "2"), resumable=True),
    Stage("evaluate", run_evaluate, True, "perplexity, forgetting, routing, translation -> report.json / report.md",
          ("evaluate.py",)),
    Stage("export", run_export, False, "the round's model to share: weights in export.dtype, tokenizer, model card",
          ("export.py",)),
)
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)


def get_stage(name: str) -> Stage:
    """The stage called ``name``."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise LayerMoEError(f"unknown stage {name!r}; stages are {list(STAGE_NAMES)}")


def finished_stages(config: RunConfig) -> list[tuple[str, str]]:
    """(round, stage) of every stage that is done, in run order, up to the first that is not (each stage's own
    check, :func:`pipeline.manifest.checking_only`: nothing runs, nothing is written). A launcher can skip these
    instead of starting processes that would only find them up to date."""
    finished = []
    with checking_only():
        for round_index, rnd in enumerate(config.rounds):
            for stage in STAGES:
                try:
                    stage.run(config, round_index, StageOptions())
                except (StageNotDone, LayerMoEError):  # would run, or cannot yet (an input is missing)
                    return finished
                finished.append((rnd.name, stage.name))
    return finished
