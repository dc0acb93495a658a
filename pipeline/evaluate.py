"""evaluate stage: per-language perplexity, forgetting, routing behaviour and translation for the base model
and every expanded model of the run so far; report.json, report.md and plots.

All models are scored on the same held-out blocks (the leading blocks of each language's held-out token store; the
models share the base tokenizer), so perplexities are directly comparable. Group averages follow the paper: old = the
base model's languages, new = every language added by an expansion round. Languages with out-of-domain text
(``data.ood_sources``, the built-in debian-reference manual for the old languages) are also scored on it: text from
a domain no training data uses, so forgetting cannot hide behind the domain the new experts learn.

Models run on ``model.device`` in ``model.dtype``. Started in several processes (torchrun, deepspeed, srun), the
ranks score disjoint blocks and translate disjoint sentences, and the sums are all-reduced, so every number is
the one a single process computes; lm-evaluation-harness tasks run on rank 0 alone, and only rank 0 writes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

from pipeline import distributed, log
from pipeline.atomic import write_json
from pipeline.base_model import load_causal_lm, pick_device, read_model_config
from pipeline.config import HarnessConfig, RunConfig
from pipeline.corpus import builtin_corpus, ood_documents, ood_source, resolve_source
from pipeline.errors import LayerMoEError
from pipeline.eval_report import (EvalReport, ExpertLayout, LanguageGroups, ModelResults, RoundLanguages,
                                  TranslationExample, TranslationScore)
from pipeline.hf_modeling.modeling_layermoe import LayerMoEForCausalLM, decoder_of, moe_blocks, output_logits
from pipeline.losses import HiddenStates, next_token_loss_sum
from pipeline.manifest import hash_path
from pipeline.packing import load_tokenizer, needs_separator
from pipeline.plan import load_model_config, plan
from pipeline.routing_stats import LayerRouting, RoutingStats, routing_from_json, routing_to_json
from pipeline.store_index import StoreIndex
from pipeline.token_blocks import BlockView


@dataclass(frozen=True)
class EvalModel:
    """A model to evaluate: its label in the report, and its HF directory."""

    label: str
    path: Path


@dataclass(frozen=True)
class LanguageScore:
    """One model on one language's held-out blocks: perplexity, scored tokens, routing (expanded models only)."""

    perplexity: float
    tokens: int
    routing: dict[int, LayerRouting] | None

    def to_json(self) -> dict:
        return {"perplexity": self.perplexity, "tokens": self.tokens,
                "routing": None if self.routing is None else routing_to_json(self.routing)}

    @classmethod
    def from_json(cls, doc: dict) -> LanguageScore:
        routing = doc["routing"]
        return cls(float(doc["perplexity"]), int(doc["tokens"]),
                   None if routing is None else routing_from_json(routing))


def heldout_blocks(config: RunConfig, languages: list[str], stores: StoreIndex) -> dict[str, torch.Tensor]:
    """Per language, up to ``evaluate.tokens_per_language`` held-out tokens in blocks ``[n, block_length]``: the
    leading blocks of its held-out store (only these are read)."""
    e = config.evaluate
    blocks = {}
    for lang in languages:
        view = BlockView(stores.open(lang, "heldout"), e.block_length)
        if view.num_blocks == 0:
            raise LayerMoEError(f"evaluate: language {lang!r} has less held-out text than one block of {e.block_length} "
                                f"tokens; lower evaluate.block_length or raise data.heldout_fraction")
        blocks[lang] = torch.from_numpy(view.leading(max(1, e.tokens_per_language // e.block_length)))
    return blocks


def ood_blocks(config: RunConfig, languages: list[str], tokenizer) -> dict[str, torch.Tensor]:
    """Per language of ``languages`` that has out-of-domain text, up to ``evaluate.tokens_per_language`` of its
    tokens (documents that also occur in the training text removed) in blocks ``[n, block_length]``: documents in
    order, each BOS (if the tokenizer adds one) + text + EOS separator, concatenated, a trailing partial block
    dropped (the token stores' document encoding; the text is small and read only here, so it has no store)."""
    e = config.evaluate
    blocks = {}
    for lang in languages:
        if ood_source(config, lang) is None:
            continue
        documents, removed = ood_documents(config, lang)
        log.info(f"evaluate: {lang} out-of-domain text: {len(documents)} documents"
                 + (f" ({removed} dropped: they occur in the training text)" if removed else ""))
        wanted = max(1, e.tokens_per_language // e.block_length) * e.block_length
        ids: list[int] = []
        for text in documents:
            doc = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            ids += doc + ([tokenizer.eos_token_id] if needs_separator(doc, tokenizer.eos_token_id) else [])
            if len(ids) >= wanted:
                break
        if len(ids) < e.block_length:
            raise LayerMoEError(f"evaluate: language {lang!r} has less out-of-domain text than one block of "
                                f"{e.block_length} tokens; lower evaluate.block_length or configure more text in "
                                f"data.ood_sources.{lang}")
        n = min(len(ids), wanted) // e.block_length
        blocks[lang] = torch.tensor(ids[:n * e.block_length], dtype=torch.long).view(n, e.block_length)
    return blocks


@torch.no_grad()
def score_blocks(model: torch.nn.Module, blocks: torch.Tensor, is_original: bool, batch_size: int,
                 chunk_tokens: int = 1024) -> LanguageScore:
    """Perplexity of ``model`` on ``blocks`` (token ids ``[n, length]``, wherever they come from) and, for an
    expanded model, its routing statistics. The LM head is applied ``chunk_tokens`` positions at a time.

    Under torch.distributed every rank calls this with the same blocks and scores ``blocks[rank::world_size]``;
    the loss sums, token counts and routing counts are all-reduced, so every rank returns the single-process
    result (up to the order of floating-point sums)."""
    dist = distributed.current()
    device = next(model.parameters()).device
    expanded = isinstance(model, LayerMoEForCausalLM)
    stats = RoutingStats()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, scored positions
    mine = blocks[dist.rank::dist.world_size]
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size].to(device)
        hidden = decoder_of(model)(input_ids=batch, use_cache=False).last_hidden_state
        total, count = next_token_loss_sum(HiddenStates(hidden, functools.partial(output_logits, model), chunk_tokens),
                                           batch)
        sums += torch.stack([total.double(), count.double()])
        if expanded:
            records = {i: b.last_routing for i, b in moe_blocks(model).items()}
            stats.add(records, torch.full((batch.numel(),), is_original, device=device))
    distributed.all_reduce_sum(sums)
    if expanded:
        stats.all_reduce({i: b.num_experts for i, b in moe_blocks(model).items()}, device)
    loss_sum, count = sums.tolist()
    return LanguageScore(math.exp(loss_sum / count), int(count), stats.summary() if expanded else None)


T = TypeVar("T")


class ResultCache:
    """Per (model, language, settings) results shared by the evaluate stages of all rounds of a run, so a
    model scored in round 1 is not scored again in round 2. Keys hash the model directory's content."""

    def __init__(self, root: Path):
        self.root = root
        self._model_hashes: dict[Path, str] = {}

    def key(self, model_path: Path, *parts) -> str:
        if model_path not in self._model_hashes:
            self._model_hashes[model_path] = hash_path(model_path)
        blob = json.dumps([self._model_hashes[model_path], *parts], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str, parse: Callable[[dict], T]) -> T | None:
        """The cached result under ``key`` read with ``parse``, or None. An unreadable entry (a corrupt file) is a
        miss, with a warning: the result is computed again and the entry rewritten."""
        path = self.root / f"{key}.json"
        if not path.is_file():
            return None
        try:
            return parse(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
            log.warn(f"evaluate cache entry {path} is unreadable ({type(e).__name__}: {str(e)[:100]}); computing it again")
            return None

    def put(self, key: str, value: dict) -> None:
        if distributed.current().is_main:
            write_json(self.root / f"{key}.json", value)


def translation_pairs(config: RunConfig, target: str, count: int, shots: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(few-shot examples, test pairs) of (English, target) sentences from the parallel evaluation set."""
    corpus = builtin_corpus(config)
    path = Path(config.evaluate.parallel_file) if config.evaluate.parallel_file else corpus and corpus.parallel_path
    if path is None or not path.is_file():
        return [], []
    pairs = []
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            src, ref = row.get("en"), row.get(target)
            if src and ref and 20 <= len(src) <= 160 and "\n" not in src + ref:
                pairs.append((src, ref))
            if len(pairs) >= shots + count:
                break
    return pairs[:shots], pairs[shots:shots + count]


@torch.no_grad()
def translate_chrf(model: torch.nn.Module, tokenizer, examples: list[tuple[str, str]], tests: list[tuple[str, str]],
                   target_name: str, max_new_tokens: int) -> TranslationScore:
    """Few-shot English -> target greedy translation, scored with corpus chrF (sacrebleu). Under torch.distributed
    every rank calls this, translates ``tests[rank::world_size]``, and gets the score of all of them."""
    import sacrebleu

    dist = distributed.current()
    device = next(model.parameters()).device
    prefix = "".join(f"English: {s}\n{target_name}: {t}\n\n" for s, t in examples)
    mine = []
    for source, _ in tests[dist.rank::dist.world_size]:
        ids = tokenizer(f"{prefix}English: {source}\n{target_name}:", return_tensors="pt")["input_ids"].to(device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        mine.append(text.split("\n")[0].strip())
    by_rank = distributed.all_gather_objects(mine)  # rank r translated tests r, r + world, ...
    hypotheses = [by_rank[i % dist.world_size][i // dist.world_size] for i in range(len(tests))]
    score = sacrebleu.corpus_chrf(hypotheses, [[ref for _, ref in tests]]).score
    samples = [TranslationExample(source, reference, hypothesis)
               for (source, reference), hypothesis in list(zip(tests, hypotheses))[:3]]
    return TranslationScore(score, len(tests), samples)


class Harness:
    """lm-evaluation-harness tasks (``evaluate.harness``) for the models of a run: the task names are checked
    once, before any model is scored; an unknown task or a failing one is a ``LayerMoEError`` naming it."""

    def __init__(self, settings: HarnessConfig):
        self.settings = settings
        self.manager, self.fingerprint = None, []
        if not settings.tasks:
            return
        import lm_eval
        from lm_eval.tasks import TaskManager  # the harness extra (checked by config validation)

        if settings.include_path and not Path(settings.include_path).is_dir():
            raise LayerMoEError(f"evaluate.harness.include_path: {settings.include_path} is not a directory")
        # lm-eval's own task index takes a while to build (thousands of YAML files): only when a task is not local
        self.manager = TaskManager(include_path=settings.include_path, include_defaults=False) \
            if settings.include_path else None
        if self.manager is None or any(task not in self.manager.all_tasks for task in settings.tasks):
            log.info("lm-evaluation-harness: indexing its tasks")
            self.manager = TaskManager(include_path=settings.include_path)
        known = set(self.manager.all_tasks)
        unknown = [task for task in settings.tasks if task not in known]
        if unknown:
            where = f"lm-eval's tasks or {settings.include_path}" if settings.include_path else "lm-eval's tasks"
            raise LayerMoEError(f"evaluate.harness.tasks: unknown lm-evaluation-harness task(s) {unknown}: not in "
                                f"{where} (a local task is a YAML file in evaluate.harness.include_path)")
        # what decides a task's result besides the model: the settings, lm-eval's version, the local task files
        local_tasks = hash_path(Path(settings.include_path)) if settings.include_path else None
        self.fingerprint = [settings.num_fewshot, settings.limit, lm_eval.__version__, local_tasks]

    def score(self, model: torch.nn.Module, tokenizer, task: str, label: str) -> dict[str, float]:
        """``task``'s metrics for ``model``, e.g. ``{"acc": 0.41, "acc_stderr": 0.02, "samples": 100}`` (a group
        task also gets its subtasks' metrics, as ``<subtask>/<metric>``)."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        s = self.settings
        limit = None if s.limit is None else (int(s.limit) if s.limit >= 1 else s.limit)
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=s.batch_size, device=str(model.device))
            results = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=s.num_fewshot, limit=limit,
                                              task_manager=self.manager, log_samples=False, verbosity="WARNING")
        except Exception as e:  # the harness raises anything (missing data offline, bad task YAML, ...)
            raise LayerMoEError(f"lm-evaluation-harness task {task!r} failed on model {label}: {type(e).__name__}: "
                                f"{str(e)[:300]}") from e
        metrics = {}
        for name, values in results["results"].items():
            prefix = "" if name == task else f"{name}/"
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics[prefix + key.replace(",none", "")] = float(value)
            if name in results.get("n-samples", {}):
                metrics[prefix + "samples"] = float(results["n-samples"][name]["effective"])
        return metrics


LANGUAGE_NAMES = {"en": "English", "es": "Spanish", "zh": "Chinese", "el": "Greek", "hu": "Hungarian", "tr": "Turkish",
                  "hi": "Hindi", "bn": "Bengali", "ne": "Nepali", "de": "German", "fr": "French", "ru": "Russian",
                  "ja": "Japanese", "ko": "Korean", "vi": "Vietnamese", "ar": "Arabic"}


def evaluate_models(config: RunConfig, models: list[EvalModel], languages: LanguageGroups, translate_labels: set[str],
                    round_name: str, stores: StoreIndex) -> EvalReport:
    """Score every model (the first is the base model) on every language's held-out blocks from ``stores``
    (perplexity, routing), translate with the models in ``translate_labels``, count parameters; the report of
    round ``round_name``."""
    scoring = _Scoring(config, languages, load_tokenizer(models[0].path), stores)
    results = {}
    for m in models:
        started = time.perf_counter()
        results[m.label] = _evaluate_model(scoring, m, m.label in translate_labels)
        log.info(f"evaluate {m.label}: done in {time.perf_counter() - started:.0f}s")
    rounds = [RoundLanguages(r.name, list(r.languages)) for r in config.rounds[:config.round_index(round_name) + 1]]
    return EvalReport(config.name, round_name, languages, results, rounds)


class _Scoring:
    """What scoring any model needs: the settings, the held-out blocks of every language (from its token store,
    tokenized with the base tokenizer, which every model of a run shares), and the result cache with its keys."""

    def __init__(self, config: RunConfig, languages: LanguageGroups, tokenizer, stores: StoreIndex):
        self.config, self.settings, self.languages, self.tokenizer = config, config.evaluate, languages, tokenizer
        self.harness = Harness(self.settings.harness)  # unknown tasks are an error before any model is scored
        self.blocks = heldout_blocks(config, languages.all, stores)
        self.ood_blocks = ood_blocks(config, languages.all, tokenizer)
        self.cache = ResultCache(Path(self.settings.cache_dir) if self.settings.cache_dir
                                 else config.run_path / ".evaluate_cache")
        # a store's key digest stands for its source's content, the split settings and the tokenizer
        self.heldout_digests = {lang: stores.entry(lang, "heldout").digest for lang in languages.all}
        self.corpus_hashes = {lang: hash_path(resolve_source(config, lang).path) for lang in self.ood_blocks}
        self.ood_hashes = {lang: hash_path(ood_source(config, lang).path) for lang in self.ood_blocks}
        self.split = (config.data.heldout_fraction, config.data.split_seed, self.settings.tokens_per_language,
                      self.settings.block_length)

    def perplexity_key(self, model_path: Path, lang: str) -> str:
        return self.cache.key(model_path, "perplexity", lang, self.heldout_digests[lang], self.split,
                              lang in self.languages.old)

    def ood_perplexity_key(self, model_path: Path, lang: str) -> str:
        return self.cache.key(model_path, "ood_perplexity", lang, self.ood_hashes[lang], self.corpus_hashes[lang],
                              self.split)

    def translation_key(self, model_path: Path, lang: str) -> str:
        e = self.settings
        return self.cache.key(model_path, "translation", lang, e.translation_sentences, e.translation_shots,
                              e.translation_max_new_tokens, e.parallel_file)


def _evaluate_model(scoring: _Scoring, m: EvalModel, translate: bool) -> ModelResults:
    """Perplexity and routing on every language, translation if asked, harness tasks, parameter count of one
    model; it is loaded only if some result is not in the cache."""
    model = functools.cache(functools.partial(load_causal_lm, m.path, scoring.config.model.dtype,
                                              pick_device(scoring.config.model.device)))
    perplexity, routing, ood_perplexity = {}, {}, {}
    for lang in scoring.languages.all:
        score = _language_score(scoring, model, m, lang)
        perplexity[lang] = score.perplexity
        if score.routing is not None:
            routing[lang] = score.routing
        log.info(f"evaluate {m.label}: {lang} perplexity {score.perplexity:.2f} over {score.tokens:,} tokens")
    for lang in scoring.ood_blocks:
        score = _language_score(scoring, model, m, lang, ood=True)
        ood_perplexity[lang] = score.perplexity
        log.info(f"evaluate {m.label}: {lang} out-of-domain perplexity {score.perplexity:.2f} over {score.tokens:,} tokens")
    model_config = read_model_config(m.path)
    experts = ExpertLayout(model_config["experts_per_layer"], model_config["classifier_layers"],
                           sum(n - 1 for n in model_config["experts_per_layer"])) if routing else None
    translation = (_translations(scoring, model, m) if translate and scoring.settings.translation_sentences > 0
                   else None)
    # harness tasks on rank 0 alone (the other ranks wait)
    harness = (distributed.run_on_main(functools.partial(_harness_scores, scoring, model, m), {})
               if scoring.harness.settings.tasks else {})
    return ModelResults(perplexity, ood_perplexity, harness, parameter_count(m.path), routing or None, experts,
                        translation)


def _harness_scores(scoring: _Scoring, model: Callable[[], torch.nn.Module], m: EvalModel) -> dict[str, dict[str, float]]:
    """Every harness task's metrics for one model, from the cache when this model was scored before."""
    harness, scores = scoring.harness, {}
    device = pick_device(harness.settings.device)
    on_device = model if device == "cpu" else functools.cache(functools.partial(load_causal_lm, m.path, "float32", device))
    for task in harness.settings.tasks:
        key = scoring.cache.key(m.path, "harness", task, harness.fingerprint)
        scores[task] = scoring.cache.get(key, dict)
        if scores[task] is None:
            scores[task] = harness.score(on_device(), scoring.tokenizer, task, m.label)
            scoring.cache.put(key, scores[task])
        shown = {k: v for k, v in scores[task].items() if "/" not in k and not k.endswith("_stderr") and k != "samples"}
        log.info(f"evaluate {m.label}: {task} " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items())
                 + f" ({scores[task].get('samples', 0):.0f} examples)")
    return scores


def _language_score(scoring: _Scoring, model: Callable[[], torch.nn.Module], m: EvalModel, lang: str,
                    ood: bool = False) -> LanguageScore:
    """One language's score (held-out, or out-of-domain with ``ood``), from the cache or computed."""
    key = scoring.ood_perplexity_key(m.path, lang) if ood else scoring.perplexity_key(m.path, lang)
    cached = scoring.cache.get(key, LanguageScore.from_json)
    if cached is not None:
        return cached
    blocks = scoring.ood_blocks[lang] if ood else scoring.blocks[lang]
    score = score_blocks(model(), blocks, lang in scoring.languages.old, scoring.settings.batch_size)
    scoring.cache.put(key, score.to_json())
    return score


def _translations(scoring: _Scoring, model: Callable[[], torch.nn.Module], m: EvalModel) -> dict[str, TranslationScore]:
    """chrF of few-shot English -> X translation for every new language with a parallel test set."""
    e = scoring.settings
    scores = {}
    for lang in scoring.languages.new:
        key = scoring.translation_key(m.path, lang)
        cached = scoring.cache.get(key, TranslationScore.from_json)
        if cached is not None:
            scores[lang] = cached
        else:
            examples, tests = translation_pairs(scoring.config, lang, e.translation_sentences, e.translation_shots)
            if not tests:
                continue
            scores[lang] = translate_chrf(model(), scoring.tokenizer, examples, tests, LANGUAGE_NAMES.get(lang, lang),
                                          e.translation_max_new_tokens)
            scoring.cache.put(key, asdict(scores[lang]))
        score = scores[lang]
        caveat = " (few sentences: a rough indication only)" if score.few_sentences else ""
        log.info(f"evaluate {m.label}: en->{lang} chrF {score.chrf:.1f} over {score.sentences} sentences{caveat}")
    return scores


def parameter_count(model_path: Path) -> int:
    """Total parameters of a dense or expanded model, from its config (no weights loaded)."""
    model_config = read_model_config(model_path)
    dense_config = load_model_config(model_path)
    experts = model_config.get("experts_per_layer") or [1] * dense_config["num_hidden_layers"]
    return plan(dense_config, experts, model_config.get("classifier_layers", [])).total
