"""The evaluate stage's result as typed objects, and report.json, the form other tools read.

report.json (keys in this order)::

    languages           {"old": [...], "new": [...]}
    rounds              [{"name", "languages"}] of the rounds evaluated so far (the model labels are their names)
    perplexity          {model label: {language: held-out perplexity}}      every model, in evaluation order
    ood_perplexity      {model label: {language: out-of-domain perplexity}}  languages with out-of-domain text
    routing             {model label: {language: {layer: statistics}}}      expanded models (pipeline/routing_stats.py)
    translation         {model label: {language: {chrf, sentences, examples}}}  models that were asked to translate
    harness             {model label: {task: {metric: value}}}               lm-evaluation-harness tasks (evaluate.harness)
    experts             {model label: {experts_per_layer, classifier_layers, new_experts}}  expanded models
    group_average       {model label: {"old": mean perplexity, "new": ...}}
    forgetting_percent  {model label: {old language: perplexity change vs the base model, %}}  all but the base
    ood_forgetting_percent  {model label: {language: out-of-domain perplexity change vs the base model, %}}
    forgetting_by_round {model label: {earlier language: {learned_in, reference, percent, ood_percent}}}: every
                        language known before the model's round, against the model that learned it (the base
                        model for the old languages, round p's final model for round p's languages)
    run, round          the run's name, the round evaluated
    parameters          {model label: total parameters}

The first model is the base model. ``group_average``, the ``*forgetting*`` sections follow from the perplexities:
they are written for readers of the file and recomputed when it is read.
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
class RoundLanguages:
    """One expansion round: its name (the label of its final model) and the languages it added."""

    name: str
    languages: list[str]


@dataclass(frozen=True)
class Forgetting:
    """How a model changed a language it knew before its round: perplexity change against the model that
    learned the language (``reference``: the base model, or an earlier round's final model), in percent."""

    language: str
    learned_in: str  # "base" or the round's name
    reference: str  # the model label compared with
    percent: float  # held-out (in-domain) perplexity change
    ood_percent: float | None  # out-of-domain perplexity change; None: no out-of-domain text


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
    ood_perplexity: dict[str, float] = field(default_factory=dict)  # language -> out-of-domain perplexity
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
    rounds: list[RoundLanguages] = field(default_factory=list)  # the rounds so far, in order

    @property
    def base_label(self) -> str:
        return next(iter(self.models))

    @property
    def ood_languages(self) -> list[str]:
        """The languages scored on out-of-domain text."""
        return list(self.models[self.base_label].ood_perplexity)

    def ood_forgetting_percent(self, label: str) -> dict[str, float]:
        """Per language with out-of-domain text, the out-of-domain perplexity change of ``label`` vs the base model, %."""
        base, mine = self.models[self.base_label].ood_perplexity, self.models[label].ood_perplexity
        return {lang: _change(mine[lang], base[lang]) for lang in base}

    def old_ood_average(self, label: str) -> float | None:
        """Mean out-of-domain perplexity of ``label`` over the old languages that have out-of-domain text."""
        ood = self.models[label].ood_perplexity
        return _mean([ood[lang] for lang in self.languages.old if lang in ood])

    def forgetting_by_round(self, label: str) -> list[Forgetting]:
        """Every language known before ``label``'s round (``<round>`` or ``<round>/stage1``) against the model that
        learned it: the base model for the old languages, round p's final model for round p's languages. Empty
        for the base model and for labels of no known round."""
        names = [r.name for r in self.rounds]
        round_name = label.split("/")[0]
        if label == self.base_label or round_name not in names:
            return []
        learned = [("base", self.base_label, self.languages.old)]
        learned += [(r.name, r.name, r.languages) for r in self.rounds[:names.index(round_name)]]
        mine = self.models[label]
        changes = []
        for learned_in, reference, languages in learned:
            if reference not in self.models:
                continue
            ref = self.models[reference]
            for lang in languages:
                ood = (_change(mine.ood_perplexity[lang], ref.ood_perplexity[lang])
                       if lang in mine.ood_perplexity and lang in ref.ood_perplexity else None)
                changes.append(Forgetting(lang, learned_in, reference, _change(mine.perplexity[lang],
                                                                               ref.perplexity[lang]), ood))
        return changes

    def group_average(self, label: str) -> GroupAverage:
        perplexity = self.models[label].perplexity
        return GroupAverage(*(_mean([perplexity[lang] for lang in group])
                              for group in (self.languages.old, self.languages.new)))

    def forgetting_percent(self, label: str) -> dict[str, float]:
        """Per old language, the perplexity change of model ``label`` against the base model, in percent."""
        base, mine = self.models[self.base_label].perplexity, self.models[label].perplexity
        return {lang: _change(mine[lang], base[lang]) for lang in self.languages.old}

    def to_json(self) -> dict:
        models = self.models.items()
        return {
            "languages": asdict(self.languages),
            "rounds": [asdict(r) for r in self.rounds],
            "perplexity": {label: m.perplexity for label, m in models},
            "ood_perplexity": {label: m.ood_perplexity for label, m in models if m.ood_perplexity},
            "routing": {label: {lang: routing_to_json(layers) for lang, layers in m.routing.items()}
                        for label, m in models if m.routing is not None},
            "translation": {label: {lang: asdict(score) for lang, score in m.translation.items()}
                            for label, m in models if m.translation is not None},
            "harness": {label: m.harness for label, m in models},
            "experts": {label: asdict(m.experts) for label, m in models if m.experts is not None},
            "group_average": {label: asdict(self.group_average(label)) for label in self.models},
            "forgetting_percent": {label: self.forgetting_percent(label) for label in self.models
                                   if label != self.base_label},
            "ood_forgetting_percent": {label: self.ood_forgetting_percent(label) for label in self.models
                                       if label != self.base_label and self.ood_languages},
            "forgetting_by_round": {label: {f.language: {k: v for k, v in asdict(f).items() if k != "language"}
                                            for f in self.forgetting_by_round(label)}
                                    for label in self.models if self.forgetting_by_round(label)},
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
                        for name in ("routing", "translation", "harness", "experts", "parameters", "ood_perplexity")}
            models = {}
            for label, perplexity in doc["perplexity"].items():
                missing = [lang for lang in languages.all if lang not in perplexity]
                if missing:
                    raise ValueError(f"model {label!r} has no perplexity for {missing}")
                routing, translation = sections["routing"].get(label), sections["translation"].get(label)
                experts, parameters = sections["experts"].get(label), sections["parameters"].get(label)
                models[label] = ModelResults(
                    perplexity={lang: float(v) for lang, v in perplexity.items()},
                    ood_perplexity={lang: float(v) for lang, v in sections["ood_perplexity"].get(label, {}).items()},
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
            rounds = [RoundLanguages(str(r["name"]), [str(lang) for lang in r["languages"]])
                      for r in doc.get("rounds", [])]
            return cls(str(doc["run"]), str(doc["round"]), languages, models, rounds)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LayerMoEError(f"{source}: not a valid evaluation report ({type(e).__name__}: {e})") from None


def read_report(path: Path) -> EvalReport:
    """Read and check a report.json."""
    return EvalReport.from_json(read_json(path, "evaluation report"), str(path))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _change(value: float, reference: float) -> float:
    """Relative change of ``value`` against ``reference``, in percent."""
    return 100 * (value - reference) / reference
