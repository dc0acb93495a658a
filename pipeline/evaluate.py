"""evaluate stage: per-language perplexity, forgetting, routing behaviour and translation for the base model
and every expanded model of the run so far; report.json, report.md and plots.

All models are scored on the same held-out blocks (the models share the base tokenizer), so perplexities are
directly comparable. Group averages follow the paper: old = the base model's languages, new = every language
added by an expansion round.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import distributed, log
from pipeline.atomic import write_json
from pipeline.base_model import load_causal_lm, read_model_config
from pipeline.config import RunConfig
from pipeline.corpus import builtin_corpus, language_documents, resolve_source
from pipeline.errors import LayerMoEError
from pipeline.hf_modeling.modeling_layermoe import LayerMoEForCausalLM, moe_blocks
from pipeline.losses import next_token_loss
from pipeline.manifest import hash_path
from pipeline.packing import load_tokenizer, pack_documents
from pipeline.routing_stats import RoutingStats


@dataclass
class EvalModel:
    label: str
    path: Path


def heldout_blocks(config: RunConfig, languages: list[str], tokenizer) -> dict[str, torch.Tensor]:
    """Per language, up to ``evaluate.tokens_per_language`` held-out tokens in blocks ``[n, block_length]``."""
    e = config.evaluate
    blocks = {}
    for lang in languages:
        docs = ((0, text) for text in language_documents(config, lang, "heldout"))
        try:
            packed = pack_documents(docs, tokenizer, e.block_length, [lang], max(1, e.tokens_per_language // e.block_length))
        except LayerMoEError:
            raise LayerMoEError(f"evaluate: language {lang!r} has less held-out text than one block of {e.block_length} "
                                f"tokens; lower evaluate.block_length or raise data.heldout_fraction") from None
        blocks[lang] = packed.input_ids
    return blocks


@torch.no_grad()
def score_language(model: torch.nn.Module, ids: torch.Tensor, is_original: bool, batch_size: int) -> dict:
    """Perplexity of ``model`` on the blocks ``ids`` and, for an expanded model, its routing statistics."""
    total, count = 0.0, 0
    stats = RoutingStats()
    expanded = isinstance(model, LayerMoEForCausalLM)
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += next_token_loss(logits, batch).item() * n
        count += n
        if expanded:
            records = {i: b.last_routing for i, b in moe_blocks(model).items()}
            stats.add(records, torch.full((batch.numel(),), is_original))
    return {"perplexity": math.exp(total / count), "tokens": count,
            "routing": {str(k): v for k, v in stats.summary().items()} if expanded else None}


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

    def get(self, key: str) -> dict | None:
        path = self.root / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

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
                   target_name: str, max_new_tokens: int) -> dict:
    """Few-shot English -> target greedy translation, scored with corpus chrF (sacrebleu)."""
    import sacrebleu

    prefix = "".join(f"English: {s}\n{target_name}: {t}\n\n" for s, t in examples)
    hypotheses = []
    for source, _ in tests:
        ids = tokenizer(f"{prefix}English: {source}\n{target_name}:", return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        hypotheses.append(text.split("\n")[0].strip())
    score = sacrebleu.corpus_chrf(hypotheses, [[ref for _, ref in tests]]).score
    return {"chrf": score, "sentences": len(tests), "examples": [
        {"source": s, "reference": r, "hypothesis": h} for (s, r), h in list(zip(tests, hypotheses))[:3]]}


def run_harness(model_path: Path, tasks: list[str]) -> dict:
    """lm-evaluation-harness on local task data, when installed; otherwise a clear 'skipped' entry."""
    if not tasks:
        return {}
    try:
        import lm_eval
    except ImportError:
        message = "lm-evaluation-harness is not installed (pip install lm-eval); harness tasks skipped"
        log.warn(message)
        return {"skipped": message}
    try:
        results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_path},trust_remote_code=True",
                                          tasks=tasks, batch_size=1)
        return {task: values for task, values in results["results"].items()}
    except Exception as e:  # most often: task data not available offline
        message = f"harness tasks {tasks} skipped: {type(e).__name__}: {e}"
        log.warn(message)
        return {"skipped": message}


LANGUAGE_NAMES = {"en": "English", "es": "Spanish", "zh": "Chinese", "el": "Greek", "hu": "Hungarian", "tr": "Turkish",
                  "hi": "Hindi", "bn": "Bengali", "ne": "Nepali", "de": "German", "fr": "French", "ru": "Russian",
                  "ja": "Japanese", "ko": "Korean", "vi": "Vietnamese", "ar": "Arabic"}


def evaluate_models(config: RunConfig, models: list[EvalModel], languages: list[str], new_languages: list[str],
                    translate_labels: set[str]) -> dict:
    """Score every model; return the report dict (perplexity, group averages, forgetting, routing, translation)."""
    e = config.evaluate
    tokenizer = load_tokenizer(models[0].path)
    blocks = heldout_blocks(config, languages, tokenizer)
    original = set(config.old_languages)
    report: dict = {"languages": {"old": [l for l in languages if l in original],
                                  "new": [l for l in languages if l not in original]},
                    "perplexity": {}, "routing": {}, "translation": {}, "harness": {}, "experts": {}}
    cache = ResultCache(config.run_path / ".evaluate_cache")
    corpus = {lang: hash_path(resolve_source(config, lang).path) for lang in languages}
    split = (config.data.heldout_fraction, config.data.split_seed, e.tokens_per_language, e.block_length)
    for m in models:
        started = time.perf_counter()
        model = None
        report["perplexity"][m.label], routing = {}, {}
        for lang in languages:
            key = cache.key(m.path, "perplexity", lang, corpus[lang], split, lang in original)
            result = cache.get(key)
            if result is None:
                model = model or load_causal_lm(m.path)
                result = score_language(model, blocks[lang], lang in original, e.batch_size)
                cache.put(key, result)
            report["perplexity"][m.label][lang] = result["perplexity"]
            if result["routing"] is not None:
                routing[lang] = result["routing"]
            log.info(f"evaluate {m.label}: {lang} perplexity {result['perplexity']:.2f} over {result['tokens']:,} tokens")
        model_config = read_model_config(m.path)
        if routing:
            report["routing"][m.label] = routing
            report["experts"][m.label] = {"experts_per_layer": model_config["experts_per_layer"],
                                          "classifier_layers": model_config["classifier_layers"],
                                          "new_experts": sum(n - 1 for n in model_config["experts_per_layer"])}
        if m.label in translate_labels and e.translation_sentences > 0:
            report["translation"][m.label] = {}
            for lang in new_languages:
                key = cache.key(m.path, "translation", lang, e.translation_sentences, e.translation_shots,
                                e.translation_max_new_tokens, e.parallel_file)
                result = cache.get(key)
                if result is None:
                    examples, tests = translation_pairs(config, lang, e.translation_sentences, e.translation_shots)
                    if not tests:
                        continue
                    model = model or load_causal_lm(m.path)
                    result = translate_chrf(model, tokenizer, examples, tests, LANGUAGE_NAMES.get(lang, lang),
                                            e.translation_max_new_tokens)
                    cache.put(key, result)
                report["translation"][m.label][lang] = result
                log.info(f"evaluate {m.label}: en->{lang} chrF {result['chrf']:.1f}")
        report["harness"][m.label] = run_harness(m.path, e.harness_tasks)
        log.info(f"evaluate {m.label}: done in {time.perf_counter() - started:.0f}s")
    base = report["perplexity"][models[0].label]
    report["group_average"] = {label: {group: _mean([p[l] for l in report["languages"][group]])
                                       for group in ("old", "new")} for label, p in report["perplexity"].items()}
    report["forgetting_percent"] = {label: {l: 100 * (p[l] - base[l]) / base[l] for l in report["languages"]["old"]}
                                    for label, p in report["perplexity"].items() if label != models[0].label}
    return report


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
