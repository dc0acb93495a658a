"""Config loading, dotted overrides and validation errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

import json

from pipeline.cli import main
from pipeline.config import RECIPES, ConfigError, RunConfig, load_config, to_dict

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
