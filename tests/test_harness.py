"""The lm-evaluation-harness bridge on a local task (a jsonl file and a task YAML; nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import HarnessConfig, installed

pytestmark = pytest.mark.skipif(not installed("lm_eval"), reason="lm-eval is not installed "
                                "(pip install 'layermoe[harness]')")

TASK = """
task: layermoe_pick
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def local_task(tmp_path_factory) -> Path:
    """A directory with one multiple-choice task over a local jsonl file (and one whose data is missing)."""
    root = tmp_path_factory.mktemp("harness")
    rows = [{"question": f"Sentence {i}: the next word is", "choices": ["alpha", "beta", "gamma"], "answer": i % 3}
            for i in range(10)]
    (root / "pick.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "pick.yaml").write_text(TASK.format(data=root / "pick.jsonl"))
    (tasks / "broken.yaml").write_text(TASK.format(data=root / "missing.jsonl").replace("layermoe_pick",
                                                                                          "layermoe_broken"))
    return tasks


def test_local_task_matches_lm_evals_own_model_loading(local_task, tiny_llama):
    """Our bridge (the model object we loaded, our settings) gives what lm-eval computes loading the same
    directory itself."""
    import lm_eval

    from pipeline.base_model import load_causal_lm
    from pipeline.evaluate import Harness
    from pipeline.packing import load_tokenizer

    settings = HarnessConfig(tasks=["layermoe_pick"], num_fewshot=1, limit=6, batch_size=2, device="cpu",
                             include_path=str(local_task))
    harness = Harness(settings)
    ours = harness.score(load_causal_lm(tiny_llama), load_tokenizer(tiny_llama), "layermoe_pick", "tiny")
    assert ours["samples"] == 6 and 0 <= ours["acc"] <= 1 and ours["acc_stderr"] > 0
    reference = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_llama},dtype=float32",
                                        tasks=["layermoe_pick"], num_fewshot=1, limit=6, batch_size=2, device="cpu",
                                        task_manager=harness.manager, log_samples=False)
    assert ours["acc"] == reference["results"]["layermoe_pick"]["acc,none"]


def test_unknown_or_failing_task_is_an_error_naming_it(local_task, tiny_llama):
    from pipeline.base_model import load_causal_lm
    from pipeline.errors import LayerMoEError
    from pipeline.evaluate import Harness
    from pipeline.packing import load_tokenizer

    with pytest.raises(LayerMoEError, match=r"unknown lm-evaluation-harness task\(s\) \['layermoe_pik'\]"):
        Harness(HarnessConfig(tasks=["layermoe_pick", "layermoe_pik"], include_path=str(local_task)))
    harness = Harness(HarnessConfig(tasks=["layermoe_broken"], limit=2, include_path=str(local_task)))
    with pytest.raises(LayerMoEError, match="task 'layermoe_broken' failed on model tiny"):
        harness.score(load_causal_lm(tiny_llama), load_tokenizer(tiny_llama), "layermoe_broken", "tiny")


def test_scores_are_cached_per_model_and_settings(local_task, tiny_llama, tmp_path):
    """A model scored in one round is not scored again in the next (the base model every round)."""
    from types import SimpleNamespace

    from pipeline.base_model import load_causal_lm
    from pipeline.evaluate import EvalModel, Harness, ResultCache, _harness_scores
    from pipeline.packing import load_tokenizer

    loads = []

    def model():
        loads.append(1)
        return load_causal_lm(tiny_llama)

    def scoring(limit):
        harness = Harness(HarnessConfig(tasks=["layermoe_pick"], limit=limit, batch_size=4, device="cpu",
                                        include_path=str(local_task)))
        return SimpleNamespace(harness=harness, cache=ResultCache(tmp_path / "cache"),
                               tokenizer=load_tokenizer(tiny_llama))

    first = _harness_scores(scoring(4), model, EvalModel("base", tiny_llama))
    again = _harness_scores(scoring(4), model, EvalModel("base", tiny_llama))
    assert first == again and first["layermoe_pick"]["samples"] == 4 and len(loads) == 1
    other = _harness_scores(scoring(3), model, EvalModel("base", tiny_llama))  # other settings: scored again
    assert other["layermoe_pick"]["samples"] == 3 and len(loads) == 2
