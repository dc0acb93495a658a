"""Two expansion rounds through the runner on a tiny model: allocation from the similarity file, growth, replay of
earlier languages in stage 2, the loss of each training stage's first step, translation chrF on a small parallel
file, the two-round report, and settings that must not re-run finished stages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import sacrebleu
import torch

from conftest import run_cli, synthetic_documents
from pipeline.allocate import reference_allocation
from pipeline.base_model import load_causal_lm
from pipeline.config import load_config
from pipeline.hf_modeling.modeling_layermoe import moe_blocks
from pipeline.packing import load_tokenizer
from pipeline.upcycle import parameter_roles
from reference_data import build_stage_data
from test_train import (by_hand_balance, by_hand_ce, by_hand_classifier, by_hand_lpr, step_log,
                        write_config)

PARALLEL = [  # the first row is too short for the test set (20 <= len(en) <= 160) and is skipped
    "Too short.",
    "Open the file menu and choose the save command.",
    "Every window has a title bar at the very top.",
    "The cat sleeps on the warm mat by the door.",
]


def write_parallel_file(path: Path) -> Path:
    el, hu = synthetic_documents("el", len(PARALLEL), seed=5), synthetic_documents("hu", len(PARALLEL), seed=5)
    path.write_text("".join(json.dumps({"en": en, "el": e, "hu": h}, ensure_ascii=False) + "\n"
                            for en, e, h in zip(PARALLEL, el, hu)))
    return path


def segment(log: str, label: str) -> str:
    """The part of a run's log written while stage ``label`` (e.g. ``g2/train_stage2``) ran."""
    return log[log.index(f"{label}: starting"):log.index(f"{label}: done")]


def first_step_by_hand(config_path: Path, round_index: int, stage: int) -> dict[str, float]:
    """A training stage's first-step loss parts computed here: the stage's input model on its first micro-batch
    (the first blocks of the shuffled stage data), the terms from the router and classifier logits."""
    config = load_config(config_path)
    rnd = config.rounds[round_index].name
    model_in = config.run_path / rnd / ("upcycle" if stage == 1 else "train_stage1") / "model"
    model = load_causal_lm(model_in).train()
    if stage == 2:
        model.set_classifiers_active(True)  # as training stage 2 does before its first step
    settings = config.train.stage1 if stage == 1 else config.train.stage2
    data = build_stage_data(config, round_index, stage, load_tokenizer(model_in))
    ids = data.blocks.input_ids[:settings.micro_batch_size]
    original = data.original_mask(data.blocks.language_ids[:settings.micro_batch_size]).reshape(-1)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    records = {i: block.last_routing for i, block in moe_blocks(model).items()}
    valid = torch.ones(ids.numel(), dtype=torch.bool)
    ce = by_hand_ce(logits, ids).item()
    t = config.train
    if stage == 1:
        balance = by_hand_balance(records, valid, model.config.num_experts_per_tok).item()
        return {"total": ce + t.alpha * balance, "ce": ce, "balance": balance}
    assert original.any() and not original.all()  # replay of the original language next to new text
    lpr = by_hand_lpr(records, original, t.lpr_form).item()
    other_form = by_hand_lpr(records, original, "paper" if t.lpr_form == "double_softmax" else "double_softmax")
    assert abs(other_form.item() - lpr) > 1e-2  # the check can tell the two forms apart
    classifier = by_hand_classifier(records, valid, original).item()
    return {"total": ce + t.gamma * lpr + t.beta * classifier, "ce": ce, "lpr": lpr, "classifier": classifier}


def greedy_by_hand(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation without a cache, cut at the first line break."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids[0].tolist() + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).split("\n")[0].strip()


def test_two_rounds_through_the_runner(train_setup, tmp_path):
    run_dir = tmp_path / "run"
    parallel = write_parallel_file(tmp_path / "parallel.jsonl")
    config = write_config(
        train_setup, run_dir, lpr_form="double_softmax", alpha=0.05, gamma=0.2, beta=0.3,
        stage1=dict(steps=3, tokens_per_language=2400), stage2=dict(steps=3, tokens_per_language=1200,
                                                                    replay_tokens_per_language=1200),
        sections={
            "cache_dir": str(tmp_path / "cache"),  # token stores of its own: other tests tokenize hu with this tokenizer
            "rounds": [{"name": "g1", "languages": ["el"]},
                       {"name": "g2", "languages": ["hu"],
                        "allocate": {"method": "reference", "delta": 4, "classifier_count": 1}}],
            "allocate": {"method": "explicit", "explicit": [3, 2], "classifier_layers": [1]},
            "upcycle": {"pooling": "sequence", "keep_router_rows": True},
            "evaluate": {"tokens_per_language": 480, "block_length": 48, "translation_sentences": 2,
                         "translation_shots": 1, "translation_max_new_tokens": 6, "parallel_file": str(parallel)},
        })
    proc = run_cli(["run", str(config)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stderr
    g1, g2 = run_dir / "g1", run_dir / "g2"

    # round 2's allocation is the configured method applied to round 2's similarity file
    scores = json.loads((g2 / "analyze" / "similarity.json").read_text())["layer_scores"]
    allocation = json.loads((g2 / "allocate" / "allocation.json").read_text())
    assert allocation["experts_per_layer"] == reference_allocation(scores, 4)
    moe_layers = [i for i, n in enumerate(allocation["experts_per_layer"]) if n > 1]
    assert allocation["classifier_layers"] == [max(moe_layers, key=lambda i: scores[i])]  # the most similar one
    assert scores[0] != scores[1]  # so a reversed score list would pick the other layer

    # growth: round-1 experts and everything of the original model carried over; router rows kept
    trained1, grown = load_causal_lm(g1 / "train_stage2" / "model"), load_causal_lm(g2 / "upcycle" / "model")
    assert trained1.config.pooling == grown.config.pooling == "sequence"
    assert all(block.pooling == "sequence" for block in moe_blocks(grown).values())
    assert grown.config.experts_per_layer == [a + b - 1 for a, b in zip([3, 2], allocation["experts_per_layer"])]
    assert [r["name"] for r in grown.config.rounds] == ["g1", "g2"]
    before, after = dict(parameter_roles(trained1)), dict(parameter_roles(grown))
    for role in ("original", "experts_round1"):
        assert [n for n, _ in before[role]] == [n for n, _ in after[role]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before[role], after[role])), role
    for i, block in moe_blocks(grown).items():
        old = moe_blocks(trained1)[i].router.weight
        assert torch.equal(block.router.weight[:old.shape[0]], old), i
    stage1 = dict(parameter_roles(load_causal_lm(g2 / "train_stage1" / "model")))
    for role in ("original", "experts_round1", "classifiers"):  # round 2's stage 1 trains round-2 experts only
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(after[role], stage1[role])), role
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(after["experts_round2"], stage1["experts_round2"]))
    # no classifier acts in round 2's stage 1 either: every round-2 expert of the classifier layer got tokens
    assert trained1.config.classifiers_active is True and grown.config.classifiers_active is False
    rounds = grown.config.expert_rounds
    for snapshot in json.loads((g2 / "train_stage1" / "routing_stats.json").read_text()):
        for layer in allocation["classifier_layers"]:
            stats = snapshot["layers"][str(layer)]
            assert stats["classifier_accuracy"] is None
            assert all(n > 0 for e, n in enumerate(stats["load"]) if rounds[layer][e] == 2), stats

    # round 2's tokenize stage (the round-1 model's tokenizer: the base one's files) tokenizes only its new language
    tokenize2 = segment(log, "g2/tokenize")
    assert re.findall(r"tokenize (\w+) \(train, heldout\): ", tokenize2) == ["hu"]
    assert sorted(re.findall(r"tokenize (\w+ \w+): cached", tokenize2)) == ["el heldout", "el train", "en heldout",
                                                                             "en train"]
    assert json.loads((g2 / "tokenize" / "stores.json").read_text())["stores"][:4] == \
        json.loads((g1 / "tokenize" / "stores.json").read_text())["stores"]

    # stage data: stage 1 the round's language, stage 2 also replays every earlier one
    def data_languages(label: str) -> list[str]:
        return re.findall(r"stage \d data: (\w+) \d+ blocks", segment(log, label))

    assert data_languages("g1/train_stage1") == ["el"] and data_languages("g1/train_stage2") == ["el", "en"]
    assert data_languages("g2/train_stage1") == ["hu"] and data_languages("g2/train_stage2") == ["hu", "en", "el"]

    # the logged loss parts of each stage's first step are the ones computed here from its input and batch
    for round_index, rnd in enumerate(("g1", "g2")):
        for stage in (1, 2):
            logged = step_log(segment(log, f"{rnd}/train_stage{stage}"), stage)[1]
            expected = first_step_by_hand(config, round_index, stage)
            assert {k: logged[k] for k in expected} == pytest.approx(expected, abs=2e-4), (rnd, stage)

    # the two-round report: every model so far on every language so far, translation scored with chrF
    report = json.loads((g2 / "evaluate" / "report.json").read_text())
    assert list(report["perplexity"]) == ["base", "g1/stage1", "g1", "g2/stage1", "g2"]
    assert report["languages"] == {"old": ["en"], "new": ["el", "hu"]}
    assert set(report["forgetting_percent"]["g2"]) == {"en"}
    # per round: en against the base model, el (learned in g1) against g1's model
    ppl, by_round = report["perplexity"], report["forgetting_by_round"]
    assert by_round["g2"]["el"]["reference"] == "g1" and by_round["g2"]["en"]["reference"] == "base"
    assert by_round["g2"]["el"]["percent"] == pytest.approx(100 * (ppl["g2"]["el"] / ppl["g1"]["el"] - 1))
    assert set(by_round["g1"]) == {"en"} and set(by_round["g2/stage1"]) == {"en", "el"}
    assert report["experts"]["g2"]["new_experts"] == sum(grown.config.experts_per_layer) - 2
    assert report["experts"]["g1"]["new_experts"] == 3
    assert set(report["translation"]) == {"base", "g1", "g2"}
    tokenizer, base = load_tokenizer(train_setup / "dense"), load_causal_lm(train_setup / "dense")
    names = {"el": "Greek", "hu": "Hungarian"}
    for label, languages in report["translation"].items():
        assert set(languages) == {"el", "hu"}
        for lang, result in languages.items():
            examples = result["examples"]
            assert result["sentences"] == 2 and [e["source"] for e in examples] == PARALLEL[2:]
            hypotheses, references = [e["hypothesis"] for e in examples], [e["reference"] for e in examples]
            assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
            if label == "base":  # the prompt: one example pair, then the source; greedy, first line
                shot, name = json.loads(parallel.read_text().splitlines()[1]), names[lang]
                prompts = [f"English: {shot['en']}\n{name}: {shot[lang]}\n\nEnglish: {e['source']}\n{name}:"
                           for e in examples]
                assert hypotheses == [greedy_by_hand(base, tokenizer, prompt, 6) for prompt in prompts]
    md = (g2 / "evaluate" / "report.md").read_text()
    assert "| g2 |" in md and "## Translation (few-shot English -> X, chrF)" in md and "g1_similarity.png" in md
    compare = run_cli(["compare", str(run_dir)], timeout=300)
    assert compare.returncode == 0 and "| run | g1 | 3 |" in compare.stdout
    assert f"| run | g2 | {report['experts']['g2']['new_experts']} |" in compare.stdout

    # another expert-parallel layout is not another result: every finished stage stays as it is
    again = run_cli(["run", str(config), "train.ep_size=2"], timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("up to date") == 16 and ": starting" not in again.stderr  # 8 stages, 2 rounds
