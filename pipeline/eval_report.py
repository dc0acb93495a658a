"""The evaluate stage's result as typed objects, and report.json, the form other tools read.

report.json (keys in this order)::

    languages           {"old": [...], "new": [...]}
    perplexity          {model label: {language: held-out perplexity}}      every model, in evaluation order
    routing             {model label: {language: {layer: statistics}}}      expanded models (pipeline/routing_stats.py)
    translation         {model label: {language: {chrf, sentences, examples}}}  models that were asked to translate
    harness             {model label: {task: {metric: value}}}               lm-evaluation-harness tasks (evaluate.harness)
    experts             {model label: {experts_per_layer, classifier_layers, new_experts}}  expanded models
    group_average       {model label: {"old": mean perplexity, "new": ...}}
    forgetting_percent  {model label: {old language: perplexity change vs the base model, %}}  all but the base
    run, round          the run's name, the round evaluated
    parameters          {model label: total parameters}

The first model is the base model. ``group_average`` and ``forgetting_percent`` follow from ``perplexity``: they
are written for readers of the file and recomputed when it is read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import read_json
from pipeline.errors import LayerMoEError
from pipeline.routing_stats import LayerRouting, routing_from_json, routing_to_json

Routing = dict[str, dict[int, LayerRouting]]  # language -> MoE layer -> statistics


@dataclass(frozen=True)
class LanguageGroups:
    """The languages of an evaluation: the base model's (old) and those added by expansion rounds (new)."""

    old: list[str]
    new: list[str]

    @property
    def all(self) -> list[str]:
        return self.old + self.new


@dataclass(frozen=True)
class GroupAverage:
    """Mean perplexity over the old and over the new languages (None for an empty group)."""

    old: float | None
    new: float | None


@dataclass(frozen=True)
class ExpertLayout:
    """An expanded model's experts: total per layer (incl. the original), classifier layers, new experts."""

    experts_per_layer: list[int]
    classifier_layers: list[int]
    new_experts: int


@dataclass(frozen=True)
class TranslationExample:
    source: str
    reference: str
    hypothesis: str


FEW_SENTENCES = 50  # chrF over fewer test sentences than this is a rough indication only


@dataclass(frozen=True)
class TranslationScore:
    """Few-shot English -> X translation: corpus chrF over ``sentences`` test sentences, and a few examples."""

    chrf: float
    sentences: int
    examples: list[TranslationExample]

    @property
    def few_sentences(self) -> bool:
        """Whether the score rests on too few sentences to compare models by it."""
        return self.sentences < FEW_SENTENCES

    @classmethod
    def from_json(cls, doc: dict) -> TranslationScore:
        return cls(float(doc["chrf"]), int(doc["sentences"]), [TranslationExample(**e) for e in doc["examples"]])


@dataclass
class ModelResults:
    """Everything measured for one model."""

    perplexity: dict[str, float]  # language -> held-out perplexity
    harness: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> value
    parameters: int | None = None  # total parameters (None in reports written before they were counted)
    routing: Routing | None = None  # None: a dense model
    experts: ExpertLayout | None = None  # None: a dense model
    translation: dict[str, TranslationScore] | None = None  # language -> score; None: not asked to translate


@dataclass
class EvalReport:
    """One round's evaluation: every model of the run so far on every language so far."""

    run: str
    round: str
    languages: LanguageGroups
    models: dict[str, ModelResults]  # by label, in evaluation order; the first is the base model

    @property
    def base_label(self) -> str:
        return next(iter(self.models))

    def group_average(self, label: str) -> GroupAverage:
        perplexity = self.models[label].perplexity
        return GroupAverage(*(_mean([perplexity[lang] for lang in group])
                              for group in (self.languages.old, self.languages.new)))

    def forgetting_percent(self, label: str) -> dict[str, float]:
        """Per old language, the perplexity change of model ``label`` against the base model, in percent."""
        base, mine = self.models[self.base_label].perplexity, self.models[label].perplexity
        return {lang: 100 * (mine[lang] - base[lang]) / base[lang] for lang in self.languages.old}

    def to_json(self) -> dict:
        models = self.models.items()
        return {
            "languages": asdict(self.languages),
            "perplexity": {label: m.perplexity for label, m in models},
            "routing": {label: {lang: routing_to_json(layers) for lang, layers in m.routing.items()}
                        for label, m in models if m.routing is not None},
            "translation": {label: {lang: asdict(score) for lang, score in m.translation.items()}
                            for label, m in models if m.translation is not None},
            "harness": {label: m.harness for label, m in models},
            "experts": {label: asdict(m.experts) for label, m in models if m.experts is not None},
            "group_average": {label: asdict(self.group_average(label)) for label in self.models},
            "forgetting_percent": {label: self.forgetting_percent(label) for label in self.models
                                   if label != self.base_label},
            "run": self.run,
            "round": self.round,
            "parameters": {label: m.parameters for label, m in models if m.parameters is not None},
        }

    @classmethod
    def from_json(cls, doc: Any, source: str = "report.json") -> EvalReport:
        """The report in ``doc`` (report.json's content); a malformed one is a ``LayerMoEError`` naming ``source``."""
        try:
            languages = LanguageGroups(*([str(lang) for lang in doc["languages"][group]] for group in ("old", "new")))
            sections = {name: doc.get(name, {})
                        for name in ("routing", "translation", "harness", "experts", "parameters")}
            models = {}
            for label, perplexity in doc["perplexity"].items():
                missing = [lang for lang in languages.all if lang not in perplexity]
                if missing:
                    raise ValueError(f"model {label!r} has no perplexity for {missing}")
                routing, translation = sections["routing"].get(label), sections["translation"].get(label)
                experts, parameters = sections["experts"].get(label), sections["parameters"].get(label)
                models[label] = ModelResults(
                    perplexity={lang: float(v) for lang, v in perplexity.items()},
                    harness={task: {k: float(v) for k, v in metrics.items()}  # (older reports: {"skipped": why})
                             for task, metrics in sections["harness"].get(label, {}).items() if isinstance(metrics, dict)},
                    parameters=None if parameters is None else int(parameters),
                    routing=None if routing is None else {lang: routing_from_json(layers)
                                                          for lang, layers in routing.items()},
                    experts=None if experts is None else ExpertLayout(**experts),
                    translation=None if translation is None else {lang: TranslationScore.from_json(score)
                                                                  for lang, score in translation.items()})
            if not models:
                raise ValueError("no model in 'perplexity'")
            unknown = sorted({label for section in sections.values() for label in section} - set(models))
            if unknown:
                raise ValueError(f"results for models {unknown} that have no perplexity")
            return cls(str(doc["run"]), str(doc["round"]), languages, models)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LayerMoEError(f"{source}: not a valid evaluation report ({type(e).__name__}: {e})") from None


def read_report(path: Path) -> EvalReport:
    """Read and check a report.json."""
    return EvalReport.from_json(read_json(path, "evaluation report"), str(path))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
