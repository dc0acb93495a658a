"""Config loading, dotted overrides and validation errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import (RECIPES, ConfigError, RunConfig, StageTrainConfig, TrainConfig, load_config,
                             result_settings, to_dict)

ROOT = Path(__file__).resolve().parents[1]

BASE = """
name: t
old_languages: [en]
rounds:
  - {name: g1, languages: [el, hu]}
  - {name: g2, languages: [tr]}
data:
  builtin_corpus: none
  sources:
    en: {path: en.jsonl}
    el: {path: el.jsonl}
    hu: {path: hu.jsonl}
    tr: {path: tr.jsonl}
allocate: {method: reference, delta: 40}
"""


def write(tmp_path: Path, text: str = BASE) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = load_config(path)
        assert isinstance(config, RunConfig) and config.rounds


def test_load_and_overrides(tmp_path):
    assert load_config(write(tmp_path), ["train.stage1.lr=1e-4"]).train.stage1.lr == 1e-4  # YAML reads 1e-4 as a string
    c = load_config(write(tmp_path), ["analyze.batch_size=3", "rounds.1.languages=[tr]", "allocate.delta=41.5",
                                      "model.path=/x", "data.sources.tr.format=jsonl"])
    assert c.analyze.batch_size == 3 and c.allocate.delta == 41.5 and c.model.path == "/x"
    assert c.data.sources["tr"].format == "jsonl"
    assert c.languages_before(1) == ["en", "el", "hu"]
    assert c.run_path == Path("runs/t")


def test_round_allocate_override(tmp_path):
    text = BASE.replace("{name: g2, languages: [tr]}", "{name: g2, languages: [tr], allocate: {method: budget, budget: 9}}")
    c = load_config(write(tmp_path, text))
    assert c.allocate_for(0).method == "reference" and c.allocate_for(1).budget == 9


@pytest.mark.parametrize("override, message", [
    ("analyze.batch_size=abc", r"^analyze\.batch_size: expected an integer"),
    ("analyze.bogus=1", r"^analyze\.bogus: unknown field"),
    ("analyze.batch_size=0", r"^analyze\.batch_size: must be >= 1"),
    ("allocate.method=magic", r"^allocate\.method: 'magic' is not one of"),
    ("allocate.delta=null", r"^allocate\.delta: required when allocate\.method is 'reference'"),
    ("rounds.1.languages=[xx]", r"^rounds\[1\]\.languages: unknown language 'xx'"),
    ("rounds.1.languages=[el]", r"already appears in rounds\[0\]\.languages"),
    ("rounds.5.languages=[el]", r"rounds\.5: '5' is not an index"),
    ("data.heldout_fraction=1.5", r"^data\.heldout_fraction: must be in \(0, 1\)"),
    ("analyze.include_special_tokens=maybe", r"^analyze\.include_special_tokens: expected true/false"),
    ("nonsense", r"expected KEY=VALUE"),
    ("recipe=authors", r"^recipe: 'authors' is not one of \['project', 'reference'\]"),
    ("expansion=full", r"^expansion: 'full' is not one of"),
    ("train.balance_form=slots", r"^train\.balance_form: 'slots' is not one of"),
    ("train.lora.rank=0", r"^train\.lora\.rank: must be >= 1"),
    ("expansion=lora train.ep_size=2", r"^train\.ep_size: expert parallelism needs experts"),
    # every numeric field's range
    ("train.stage1.lr=.inf", r"^train\.stage1\.lr: must be a finite number > 0, got inf"),
    ("train.stage2.lr=.nan", r"^train\.stage2\.lr: must be a finite number > 0, got nan"),
    ("train.stage1.lr=0", r"^train\.stage1\.lr: must be a finite number > 0"),
    ("train.stats_every=0", r"^train\.stats_every: must be >= 1, got 0"),
    ("train.checkpoint_every=-1", r"^train\.checkpoint_every: must be >= 0, got -1"),
    ("train.alpha=-0.1", r"^train\.alpha: must be a finite number >= 0"),
    ("train.gamma=.inf", r"^train\.gamma: must be a finite number >= 0, got inf"),
    ("train.beta=-1", r"^train\.beta: must be a finite number >= 0"),
    ("train.gradient_clipping=-1", r"^train\.gradient_clipping: must be a finite number >= 0"),
    ("train.weight_decay=-0.01", r"^train\.weight_decay: must be a finite number >= 0"),
    ("train.stage2.replay_tokens_per_language=-5", r"^train\.stage2\.replay_tokens_per_language: must be >= 0"),
    ("evaluate.translation_max_new_tokens=0", r"^evaluate\.translation_max_new_tokens: must be >= 1"),
    ("evaluate.translation_shots=-1", r"^evaluate\.translation_shots: must be >= 0"),
    ("upcycle.verify_tolerance=.inf", r"^upcycle\.verify_tolerance: must be a finite number > 0, got inf"),
    ("upcycle.top_k=0", r"^upcycle\.top_k: must be >= 1"),
    ("allocate.delta=.inf", r"^allocate\.delta: must be a finite number > 0"),
    ("seed=-1", r"^seed: must be in \[0, 2\^63\)"),
    ("allocate.method=explicit allocate.explicit=[1,1,1]", r"^upcycle\.top_k: 2 is larger than every layer's expert "
                                                          r"count \(at most 1 in allocate\.explicit\)"),
    ("allocate.method=uniform allocate.experts_per_layer=1", r"^upcycle\.top_k: 2 is larger than every layer's expert count"),
])
def test_errors_name_the_field(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path), override.split(" "))


def test_missing_required_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="rounds: required field is missing"):
        load_config(write(tmp_path, "name: x\nold_languages: [en]\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed\n"))


def _setting(config: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def test_recipes_preset_fields_that_are_not_set_explicitly(tmp_path, capsys):
    project = load_config(write(tmp_path))
    assert project.recipe == "project"
    # the project recipe is the dataclass defaults, so a config without a recipe means the same thing
    defaults = RunConfig(name="x", old_languages=["en"], rounds=[])
    assert {key: _setting(project, key) for key in RECIPES["project"]} == RECIPES["project"]
    assert {key: _setting(defaults, key) for key in RECIPES["project"]} == RECIPES["project"]
    reference = load_config(write(tmp_path), ["recipe=reference"])
    assert {key: _setting(reference, key) for key in RECIPES["reference"]} == {
        "train.balance_form": "reference", "train.lpr_form": "double_softmax", "train.lpr_reduction": "expert_groups",
        "train.classifier_label": "sequence", "upcycle.pooling": "sequence"}
    # a single field set in the YAML or on the command line wins over the preset
    yaml_set = BASE + "recipe: reference\ntrain: {lpr_form: paper}\n"
    mixed = load_config(write(tmp_path, yaml_set), ["upcycle.pooling=prefix"])
    assert mixed.train.lpr_form == "paper" and mixed.upcycle.pooling == "prefix"
    assert mixed.train.lpr_reduction == "expert_groups" and mixed.train.classifier_label == "sequence"
    # show-config prints the resolved values
    assert main(["show-config", str(write(tmp_path)), "recipe=reference", "train.classifier_label=token"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["recipe"] == "reference" and shown["train"]["lpr_form"] == "double_softmax"
    assert shown["train"]["classifier_label"] == "token" and shown["upcycle"]["pooling"] == "sequence"
    assert shown == to_dict(load_config(write(tmp_path), ["recipe=reference", "train.classifier_label=token"]))


def test_a_config_file_that_is_not_utf8_is_one_clear_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.replace("name: t", "name: caf\xe9").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"config file '.*latin1\.yaml' is not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        load_config(path)


def test_run_settings_are_left_out_of_the_result_settings_at_every_depth():
    settings = result_settings({"train": TrainConfig(), "seed": 3})
    assert {"stats_every", "checkpoint_every", "tracking", "ep_size", "loss_chunk_tokens",
            "activation_checkpointing"}.isdisjoint(settings["train"])
    assert settings["train"]["alpha"] == 0.01 and settings["train"]["stage1"]["lr"] == StageTrainConfig().lr
    assert settings["seed"] == 3


@pytest.mark.parametrize("override, module, message", [
    ("train.tracking.tensorboard=true", "tensorboard", "train.tracking.tensorboard: needs the tensorboard package, "
                                                       "which is not installed (pip install 'layermoe[tracking]')"),
    ("train.tracking.wandb=true", "wandb", "train.tracking.wandb: needs the wandb package"),
    ("evaluate.harness.tasks=[arc_easy]", "lm_eval", "evaluate.harness.tasks: needs the lm_eval package, which is not "
                                                     "installed (pip install 'layermoe[harness]')"),
])
def test_a_missing_optional_package_is_one_line_before_any_work(tmp_path, override, module, message):
    """In a fresh process where the package cannot be imported: exit 2, one line, and no run directory."""
    import subprocess
    import sys

    config = write(tmp_path, BASE + f"run_dir: {tmp_path}/run\n")
    code = (f"import sys; sys.modules[{module!r}] = None\n"  # as if not installed
            f"from pipeline.cli import main; sys.exit(main(['run', {str(config)!r}, {override!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
