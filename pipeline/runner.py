"""The stages as pipeline steps: where each reads its inputs and writes its outputs, and the whole-run loop.

Layout of a run directory::

    runs/<name>/<round>/analyze/   similarity.json, similarity.png, manifest.json
    runs/<name>/<round>/allocate/  allocation.json, allocation.png, manifest.json
    runs/<name>/<round>/upcycle/   model/ (expanded HF directory), manifest.json
    runs/<name>/<round>/train_stage1/, train_stage2/   model/, routing_stats.json, manifest.json
    runs/<name>/<round>/train_stage1.checkpoints/, ...  DeepSpeed checkpoints (resume after an interruption)
    runs/<name>/<round>/evaluate/  report.json, report.md, *.png, manifest.json
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Iterator

import torch

from pipeline import distributed, log
from pipeline.allocate import allocate, read_allocation
from pipeline.analyze import language_means
from pipeline.atomic import read_json, write_json
from pipeline.base_model import load_causal_lm, pick_device, read_model_config, resolve_model_path
from pipeline.export import export_model
from pipeline.config import RunConfig, to_dict
from pipeline.corpus import iter_documents, resolve_source
from pipeline.errors import LayerMoEError
from pipeline.eval_report import EvalReport, LanguageGroups, read_report
from pipeline.evaluate import EvalModel, evaluate_models
from pipeline.hf_modeling.modeling_layermoe import LayerMoEForCausalLM
from pipeline.launch import MULTI_PROCESS_STAGES, run_stage_in_processes
from pipeline.manifest import StageSpec, run_stage
from pipeline.packing import load_tokenizer
from pipeline.plan import format_plan, plan
from pipeline.plots import plot_allocation, plot_similarity
from pipeline.report import plot_perplexity, plot_routing_heatmap, short_table, write_report_md
from pipeline.similarity import Similarity, group_similarities, layer_scores, pairwise_similarities, read_similarity
from pipeline.upcycle import ExpansionRound, grow, upcycle

STAGES = ("analyze", "allocate", "upcycle", "train_stage1", "train_stage2", "evaluate")


class RoundNotReady(LayerMoEError):
    """A round's input model (the previous round's trained model) does not exist yet."""


def stage_dir(config: RunConfig, round_index: int, stage: str) -> Path:
    return config.run_path / config.rounds[round_index].name / stage


def trained_model_dir(config: RunConfig, round_index: int) -> Path:
    """Where round ``round_index``'s final (stage-2 trained) expanded model lives."""
    return stage_dir(config, round_index, "train_stage2") / "model"


def round_input_model(config: RunConfig, round_index: int) -> Path:
    """The model a round starts from: the base model for the first round, else the previous round's result."""
    if round_index == 0:
        return resolve_model_path(config.model, config.cache_path)
    previous = trained_model_dir(config, round_index - 1)
    if not previous.is_dir():
        raise RoundNotReady(f"round {config.rounds[round_index].name!r} starts from round "
                            f"{config.rounds[round_index - 1].name!r}'s trained model at {previous}, which does not exist")
    return previous


def run_analyze(config: RunConfig, round_index: int, force: bool = False) -> Path:
    """analyze: similarity.json + similarity.png for one round."""
    rnd = config.rounds[round_index]
    old, new = config.languages_before(round_index), list(rnd.languages)
    model_path = round_input_model(config, round_index)
    sources = {lang: resolve_source(config, lang) for lang in old + new}
    spec = StageSpec(
        stage="analyze", round_name=rnd.name, out_dir=stage_dir(config, round_index, "analyze"),
        config_slice={"analyze": to_dict(config.analyze), "old": old, "new": new, "model_dtype": config.model.dtype,
                      "split": {"heldout_fraction": config.data.heldout_fraction, "seed": config.data.split_seed},
                      "sources": {lang: {**dataclasses.asdict(s), "path": str(s.path)} for lang, s in sources.items()}},
        inputs={"model": model_path, **{f"corpus:{lang}": s.path for lang, s in sources.items()}},
    )

    def body(out: Path | None) -> dict:
        a = config.analyze
        device = pick_device(config.model.device)
        log.info(f"analyze: loading {model_path} ({config.model.dtype}, {device})")
        model = load_causal_lm(model_path, config.model.dtype, device)
        tokenizer = load_tokenizer(model_path)
        documents = {lang: iter_documents(sources[lang], "train", config.data.heldout_fraction, config.data.split_seed)
                     for lang in old + new}
        means, counts = language_means(model, tokenizer, documents, a.tokens_per_language, a.max_length,
                                       a.batch_size, a.include_special_tokens)
        pairs = pairwise_similarities(means)
        sim = Similarity(old, new, len(next(iter(means.values()))), pairs,
                         layer_scores(pairs, old, new, "nn_no_mean"), "nn_no_mean")
        if out is not None:
            write_json(out / "similarity.json", sim.to_json(tokens=counts, model=str(model_path)))
            groups = {k: v for k, v in group_similarities(pairs, old, new).items() if k != "all_pairs"}
            plot_similarity(groups, sim.layer_scores, f"{rnd.name}: new {new} vs old {old}", out / "similarity.png")
        lo, hi = min(sim.layer_scores), max(sim.layer_scores)
        log.info(f"analyze {rnd.name}: S ranges {lo:.4f}..{hi:.4f} over {sim.num_layers} layers "
                 f"(lowest at layer {sim.layer_scores.index(lo)}, highest at layer {sim.layer_scores.index(hi)})")
        return {"tokens": counts, "num_layers": sim.num_layers}

    return run_stage(spec, body, force)


def run_allocate(config: RunConfig, round_index: int, force: bool = False) -> Path:
    """allocate: allocation.json + allocation.png for one round, from that round's similarity.json."""
    rnd = config.rounds[round_index]
    settings = config.allocate_for(round_index)
    model_path = round_input_model(config, round_index)
    similarity_file = stage_dir(config, round_index, "analyze") / "similarity.json"
    spec = StageSpec(
        stage="allocate", round_name=rnd.name, out_dir=stage_dir(config, round_index, "allocate"),
        config_slice={"allocate": to_dict(settings)},
        inputs={"similarity": similarity_file, "model_config": model_path / "config.json"},
    )

    def body(out: Path | None) -> dict:
        model_config = read_model_config(model_path)
        existing = model_config.get("experts_per_layer")  # an expanded model grows by this round's experts
        base_config = model_config["base_config"] if existing else model_config
        num_layers = base_config["num_hidden_layers"]
        sim = read_similarity(similarity_file)
        scores = layer_scores(sim.pairs, sim.old, sim.new, settings.aggregation)
        result = allocate(settings, scores, num_layers)
        totals = [e + n - 1 for e, n in zip(existing, result.experts_per_layer)] if existing else result.experts_per_layer
        params = plan(base_config, totals, result.classifier_layers)
        log.info(f"allocate {rnd.name}: {result.method} -> experts per layer {result.experts_per_layer} "
                 f"({sum(result.new_experts_per_layer)} new), classifier layers {result.classifier_layers}")
        log.info("parameter plan (top-2):\n" + format_plan(params))
        if out is not None:
            write_json(out / "allocation.json", result.to_json(
                aggregation=settings.aggregation, round=rnd.name, new_languages=rnd.languages,
                parameters={"total": params.total, "activated_top2": params.activated, "dense": params.dense_total}))
            plot_allocation(result.experts_per_layer, result.classifier_layers,
                            f"{rnd.name}: {sum(result.new_experts_per_layer)} new experts ({result.method})",
                            out / "allocation.png")
        return {"total_new_experts": sum(result.new_experts_per_layer), "classifier_layers": result.classifier_layers}

    if not similarity_file.is_file():
        raise LayerMoEError(f"allocate {rnd.name}: {similarity_file} does not exist; run the analyze stage first")
    return run_stage(spec, body, force)


def verification_text(config: RunConfig, languages: list[str], tokenizer, tokens: int = 96) -> torch.Tensor:
    """A short real sample (the start of the first document of each language) for function-preservation checks."""
    ids = []
    for lang in languages:
        document = next(iter_documents(resolve_source(config, lang), "train", config.data.heldout_fraction,
                                       config.data.split_seed))
        ids += tokenizer(document)["input_ids"][: tokens // len(languages)]
    return torch.tensor([ids])


def run_upcycle(config: RunConfig, round_index: int, force: bool = False) -> Path:
    """upcycle: the round's input model + allocation.json -> the expanded model (first round: upcycle the dense
    model, checked to compute the same logits; later rounds: grow the previous round's model)."""
    rnd = config.rounds[round_index]
    model_path = round_input_model(config, round_index)
    allocation_file = stage_dir(config, round_index, "allocate") / "allocation.json"
    spec = StageSpec(
        stage="upcycle", round_name=rnd.name, out_dir=stage_dir(config, round_index, "upcycle"),
        config_slice={"upcycle": to_dict(config.upcycle), "seed": config.seed, "model_dtype": config.model.dtype,
                      "old_languages": config.old_languages},
        inputs={"model": model_path, "allocation": allocation_file},
    )

    def body(out: Path | None) -> dict:
        u = config.upcycle
        allocation = read_allocation(allocation_file)
        model = load_causal_lm(model_path, config.model.dtype, "cpu")
        expansion = ExpansionRound(rnd.name, list(rnd.languages), allocation.experts_per_layer, allocation.classifier_layers)
        summary: dict = {"experts_per_layer": None}
        if isinstance(model, LayerMoEForCausalLM):
            log.info(f"upcycle {rnd.name}: growing {model_path} by {sum(allocation.new_experts_per_layer)} experts")
            expanded = grow(model, expansion, keep_router_rows=u.keep_router_rows, seed=config.seed)
        else:
            log.info(f"upcycle {rnd.name}: {sum(allocation.new_experts_per_layer)} new experts, "
                     f"classifiers in layers {allocation.classifier_layers}")
            sample = verification_text(config, config.languages_before(round_index) + list(rnd.languages),
                                       load_tokenizer(model_path))
            with torch.no_grad():
                dense_logits = model(sample).logits
            expanded = upcycle(model, expansion, config.old_languages, u.top_k, u.pooling, config.seed)
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
            export_model(expanded, out / "model", tokenizer_from=model_path)
        return summary

    return run_stage(spec, body, force)


def run_train(config: RunConfig, round_index: int, stage: int, force: bool = False) -> Path:
    """train_stage1 / train_stage2: train the previous stage's model, export the result as an HF directory."""
    from pipeline.train import describe_settings, init_deepspeed_distributed, train_stage

    rnd = config.rounds[round_index]
    name = f"train_stage{stage}"
    model_in = stage_dir(config, round_index, "upcycle" if stage == 1 else "train_stage1") / "model"
    if not model_in.is_dir():
        raise LayerMoEError(f"{rnd.name}/{name}: input model {model_in} does not exist; run the earlier stages first")
    out_dir = stage_dir(config, round_index, name)
    checkpoints = out_dir.parent / f"{name}.checkpoints"
    settings = describe_settings(config, stage)
    sources = {lang: resolve_source(config, lang) for lang in config.languages_before(round_index + 1)}
    spec = StageSpec(stage=name, round_name=rnd.name, out_dir=out_dir, config_slice=settings,
                     inputs={"model": model_in, **{f"corpus:{lang}": s.path for lang, s in sources.items()}})

    def body(out: Path | None) -> dict:
        init_deepspeed_distributed()
        marker = checkpoints / "fingerprint.json"
        if distributed.current().is_main:  # only rank 0 looks: the others would race with its writes
            if checkpoints.exists() and (not marker.exists() or json.loads(marker.read_text()) != settings):
                log.warn(f"{checkpoints} belongs to other settings; starting {name} from scratch")
                shutil.rmtree(checkpoints)
            checkpoints.mkdir(parents=True, exist_ok=True)
            write_json(marker, settings)
        distributed.barrier()
        result = train_stage(config, round_index, stage, model_in, checkpoints, out / "model" if out else None)
        if out is not None and (checkpoints / "routing_stats.json").exists():
            shutil.copyfile(checkpoints / "routing_stats.json", out / "routing_stats.json")
        return {"steps": result.steps, "final_loss": result.final_loss, "tokens_per_second": result.tokens_per_second,
                "peak_memory_gib": result.peak_memory_gib}

    return run_stage(spec, body, force)


def evaluated_models(config: RunConfig, round_index: int) -> list[EvalModel]:
    """The models a round's evaluation scores: the base model, then each round's (stage-1 and) final model."""
    models = [EvalModel("base", round_input_model(config, 0))]
    for q in range(round_index + 1):
        name = config.rounds[q].name
        if config.evaluate.include_stage1_models:
            models.append(EvalModel(f"{name}/stage1", stage_dir(config, q, "train_stage1") / "model"))
        models.append(EvalModel(name, trained_model_dir(config, q)))
    return models


def run_evaluate(config: RunConfig, round_index: int, force: bool = False) -> Path:
    """evaluate: the base model and every model of the run up to this round, on every language so far."""
    rnd = config.rounds[round_index]
    models = evaluated_models(config, round_index)
    known = config.languages_before(round_index + 1)
    languages = LanguageGroups([l for l in known if l in config.old_languages],
                               [l for l in known if l not in config.old_languages])
    sources = {lang: resolve_source(config, lang) for lang in languages.all}
    spec = StageSpec(stage="evaluate", round_name=rnd.name, out_dir=stage_dir(config, round_index, "evaluate"),
                     config_slice={"evaluate": to_dict(config.evaluate), "languages": languages.all,
                                   "models": [m.label for m in models]},
                     inputs={**{f"model:{m.label}": m.path for m in models},
                             **{f"corpus:{lang}": s.path for lang, s in sources.items()}})
    return run_stage(spec, functools.partial(_evaluate, config, round_index, models, languages), force)


def _evaluate(config: RunConfig, round_index: int, models: list[EvalModel], languages: LanguageGroups,
              out: Path | None) -> dict:
    translate = {"base"} | {config.rounds[q].name for q in range(round_index + 1)}
    report = evaluate_models(config, models, languages, translate, config.rounds[round_index].name)
    if out is not None:
        figures = _report_figures(config, round_index, report, out)
        report.write(out / "report.json")
        write_report_md(report, out / "report.md", figures)
    log.info("perplexity, base vs final model:\n" + short_table(report))
    return {"group_average": report.to_json()["group_average"]}


def _report_figures(config: RunConfig, round_index: int, report: EvalReport, out: Path) -> list[str]:
    """Plot the report's figures into ``out`` and copy in each round's similarity and allocation plots."""
    figures = ["perplexity.png"]
    plot_perplexity(report, out / "perplexity.png")
    for label, results in report.models.items():
        if results.routing is not None:
            name = f"routing_{label.replace('/', '_')}.png"
            plot_routing_heatmap(results.routing, f"{label}: expert load per language", out / name)
            figures.append(name)
    for q in range(round_index + 1):
        for stage, png in (("analyze", "similarity.png"), ("allocate", "allocation.png")):
            source = stage_dir(config, q, stage) / png
            if source.exists():
                target = f"{config.rounds[q].name}_{png}"
                shutil.copyfile(source, out / target)
                figures.append(target)
    return figures


STAGE_FUNCTIONS = {
    "analyze": run_analyze, "allocate": run_allocate, "upcycle": run_upcycle,
    "train_stage1": lambda config, r, force=False: run_train(config, r, 1, force),
    "train_stage2": lambda config, r, force=False: run_train(config, r, 2, force),
    "evaluate": run_evaluate,
}


def ready_rounds(config: RunConfig) -> Iterator[int]:
    """Round indices in order, as long as each round's input model exists.

    A round after the first needs the previous round's trained model; when it is not there this logs why
    and stops (not an error: everything that could run has run).
    """
    for r, rnd in enumerate(config.rounds):
        try:
            round_input_model(config, r)
        except RoundNotReady as e:
            log.info(f"stopping before round {rnd.name!r}: {e}. The stages in this version are {list(STAGES)}.")
            return
        yield r


def experiment_identity(config: dict) -> dict:
    """What makes two configs the same experiment (a config as a dict, as in ``<run_dir>/config.json``): the
    base model, the languages it knows, and where the text comes from and how it is split (``data.sources``
    are compared separately: a later round may add languages). Everything else (steps, learning rates,
    allocation, evaluation, layout) may change between invocations: the stages it concerns re-run, as their
    manifests record."""
    return {"model.path": config["model"]["path"], "old_languages": config["old_languages"],
            **{f"data.{k}": config["data"][k] for k in ("builtin_corpus", "heldout_fraction", "split_seed")}}


def claim_run_dir(config: RunConfig, start_over: bool = False) -> None:
    """Make ``config.run_path`` this config's run directory, refusing one made by a different experiment
    (``experiment_identity``, and rounds that disagree on a common prefix; adding rounds is the lifelong
    case and is fine) unless ``start_over``, which deletes it first. Writes ``config.json``."""
    path, saved_file = config.run_path, config.run_path / "config.json"
    if start_over and path.exists():
        if distributed.current().is_main:
            log.warn(f"--start-over: deleting {path}")
            shutil.rmtree(path)
        distributed.barrier()
    elif saved_file.is_file():
        saved, mine = read_json(saved_file, "run config"), to_dict(config)
        old, new = experiment_identity(saved), experiment_identity(mine)
        differences = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new[k]]
        differences += [f"data.sources.{lang}: {source} -> {mine['data']['sources'].get(lang)}"
                        for lang, source in saved["data"]["sources"].items() if mine["data"]["sources"].get(lang) != source]
        differences += [f"rounds[{i}]: {a['name']} {a['languages']} -> {b['name']} {b['languages']}"
                        for i, (a, b) in enumerate(zip(saved["rounds"], mine["rounds"]))
                        if (a["name"], a["languages"]) != (b["name"], b["languages"])]
        if differences:
            raise LayerMoEError(f"{path} holds a run of a different experiment ({'; '.join(differences)}); "
                                f"use another name (name=...) or run_dir, or `layermoe run ... --start-over` to "
                                f"delete it and start again")
    if distributed.current().is_main:
        path.mkdir(parents=True, exist_ok=True)
        write_json(saved_file, to_dict(config))
    distributed.barrier()


def run_pipeline(config: RunConfig, force: bool = False, first: str | None = None, last: str | None = None,
                 start_over: bool = False) -> None:
    """Every stage of every ready round, in order; finished stages are skipped. ``first``/``last`` restrict
    the stages run in each round (``--from``, ``--until``; both = ``--only``). With
    ``launch.processes_per_node > 1`` the multi-process stages run under the DeepSpeed launcher."""
    for name in (first, last):
        if name is not None and name not in STAGES:
            raise LayerMoEError(f"unknown stage {name!r}; stages are {list(STAGES)}")
    selected = STAGES[STAGES.index(first) if first else 0: STAGES.index(last) + 1 if last else len(STAGES)]
    claim_run_dir(config, start_over)
    processes = config.launch.processes_per_node
    for r in ready_rounds(config):
        for stage in selected:
            if stage in MULTI_PROCESS_STAGES and processes > 1 and distributed.current().world_size == 1:
                run_stage_in_processes(config.run_path / "config.json", stage, config.rounds[r].name, [], processes, force)
            else:
                STAGE_FUNCTIONS[stage](config, r, force)
    report = stage_dir(config, len(config.rounds) - 1, "evaluate") / "report.md"
    if report.exists() and "evaluate" in selected:
        print(f"\nReport: {report}\n\n{short_table(read_report(report.with_name('report.json')))}", flush=True)
    log.info(f"run complete: {config.run_path}")
