"""Config loading, dotted overrides and validation errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunConfig, load_config

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
])
def test_errors_name_the_field(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path), [override])


def test_missing_required_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="rounds: required field is missing"):
        load_config(write(tmp_path, "name: x\nold_languages: [en]\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed\n"))


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
