"""The tokenize stage through the command line: stores.json, what the consumers read, cache hits (a second run, a
gone store), and its errors, each one line with exit status 2 in a real process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_tiny_model, run_cli, synthetic_documents, write_jsonl
from pipeline.cli import main
from pipeline.errors import LayerMoEError
from pipeline.store_index import StoreIndex
from pipeline.token_store import TOKENIZER_FILES, TokenStore, tokenizer_fingerprint

LANGS = ("en", "el", "hu")


@pytest.fixture
def config(tmp_path, tokenizer_dir) -> Path:
    model = make_tiny_model(tmp_path / "model", "llama", tokenizer_dir, seed=3, layers=2)
    sources = {lang: {"path": str(write_jsonl(tmp_path / "data" / f"{lang}.jsonl", synthetic_documents(lang, 60, seed=9)))}
               for lang in LANGS}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({
        "name": "t", "run_dir": str(tmp_path / "runs" / "{name}"), "cache_dir": str(tmp_path / "cache"),
        "old_languages": ["en"], "rounds": [{"name": "g1", "languages": ["el", "hu"]}], "model": {"path": str(model)},
        "data": {"builtin_corpus": "none", "sources": sources, "heldout_fraction": 0.1, "tokenize_workers": 2},
        "analyze": {"tokens_per_language": 200, "batch_size": 4, "max_length": 48},
        "allocate": {"method": "explicit", "explicit": [3, 2], "classifier_layers": [1]},
        "train": {"stage1": {"block_length": 32}, "stage2": {"block_length": 32}},
        "evaluate": {"block_length": 32},
    }))
    return path


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The single ERROR line of a run that exited with status 2."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_stores_json_lists_every_split_and_a_second_run_tokenizes_nothing(config, tmp_path, capsys):
    assert main(["tokenize", str(config)]) == 0
    g1 = tmp_path / "runs" / "t" / "g1"
    listed = json.loads((g1 / "tokenize" / "stores.json").read_text())
    model = tmp_path / "model"
    assert listed["tokenizer_fingerprint"] == tokenizer_fingerprint(model)
    assert sorted((e["language"], e["split"]) for e in listed["stores"]) == sorted(
        (lang, split) for lang in LANGS for split in ("train", "heldout"))
    for entry in listed["stores"]:
        store = TokenStore.open(Path(entry["path"]), tokenizer=model)
        assert Path(entry["path"]).parent == tmp_path / "cache" / "tokens"
        assert (entry["digest"], entry["documents"], entry["tokens"], entry["dtype"]) == (
            store.meta.key.digest(), store.num_documents, store.num_tokens, "uint16")
    manifest = json.loads((g1 / "tokenize" / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {f"corpus:{lang}" for lang in LANGS} | {
        f"tokenizer:{name}" for name in TOKENIZER_FILES if (model / name).is_file()}
    assert "tokenize_workers" not in json.dumps(manifest["config"])
    first = capsys.readouterr().err
    assert first.count(" workers") >= 1 and "cached" not in first

    # the same run again, with another number of workers: up to date; another run: every store from the cache
    assert main(["tokenize", str(config), "data.tokenize_workers=1"]) == 0
    assert "g1/tokenize: up to date" in capsys.readouterr().err
    assert main(["tokenize", str(config), "name=other"]) == 0
    err = capsys.readouterr().err
    assert err.count(": cached, ") == 6 and " workers" not in err and "joining" not in err
    other = tmp_path / "runs" / "other" / "g1" / "tokenize" / "stores.json"
    assert other.read_bytes() == (g1 / "tokenize" / "stores.json").read_bytes()

    # the consumers read stores.json, not the corpora
    assert main(["analyze", str(config)]) == 0
    assert set(json.loads((g1 / "analyze" / "manifest.json").read_text())["inputs"]) == {"model", "stores"}

    # a store that was deleted from the cache is made again (same bytes, same list), and analyze stays up to date
    gone = Path(listed["stores"][0]["path"])
    ids = (gone / "ids.npy").read_bytes()
    shutil.rmtree(gone)
    capsys.readouterr()
    assert main(["run", str(config), "--until", "analyze"]) == 0
    err = capsys.readouterr().err
    assert "is gone; tokenizing again" in err and "g1/analyze: up to date" in err
    assert (gone / "ids.npy").read_bytes() == ids
    assert json.loads((g1 / "tokenize" / "stores.json").read_text()) == listed


def test_a_store_list_of_another_tokenizer_or_store_is_refused(config, tmp_path):
    assert main(["tokenize", str(config)]) == 0
    stores_json = tmp_path / "runs" / "t" / "g1" / "tokenize" / "stores.json"
    other = tmp_path / "other_model"
    shutil.copytree(tmp_path / "model", other)
    settings = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 77}))
    with pytest.raises(LayerMoEError, match=r"were made with another tokenizer .* run the tokenize stage again"):
        StoreIndex.read(stores_json, other)
    index = StoreIndex.read(stores_json, tmp_path / "model")
    listed = json.loads(stores_json.read_text())
    el, hu = (next(e for e in listed["stores"] if (e["language"], e["split"]) == (lang, "train")) for lang in ("el", "hu"))
    el["path"] = hu["path"]  # a list that names the wrong store
    stores_json.write_text(json.dumps(listed))
    with pytest.raises(LayerMoEError, match=r"is not the one .*stores\.json lists"):
        StoreIndex.read(stores_json, tmp_path / "model").open("el", "train")
    assert index.open("hu", "train").num_tokens == hu["tokens"]
    with pytest.raises(LayerMoEError, match=r"lists no heldout store for language 'tr'"):
        index.open("tr", "heldout")


def test_errors_through_the_command_line(config, tmp_path):
    g1 = tmp_path / "runs" / "t" / "g1"
    # a consumer before the tokenize stage
    line = one_error(run_cli(["analyze", str(config)]))
    assert f"g1/analyze: {g1 / 'tokenize' / 'stores.json'} does not exist; run the tokenize stage first" in line

    # a source too small for one training block, an empty source: nothing written in the run directory
    line = one_error(run_cli(["tokenize", str(config), "train.stage1.block_length=100000"]))
    assert f"language 'el': corpus '{tmp_path / 'data' / 'el.jsonl'}' is too small: its train split has " in line
    assert "fewer than one block of train.stage1.block_length=100000" in line
    empty = write_jsonl(tmp_path / "data" / "empty.jsonl", ["", "   "])
    line = one_error(run_cli(["tokenize", str(config), f"data.sources.hu.path={empty}", "name=empty"]))
    assert f"language 'hu': corpus '{empty}' has no non-empty documents" in line
    assert not (g1 / "tokenize").exists() and not (tmp_path / "runs" / "empty" / "g1" / "tokenize").exists()

    # a truncated store: every reader (and the tokenize stage's cache hit) names the file and what to do
    assert main(["tokenize", str(config)]) == 0
    el = StoreIndex.read(g1 / "tokenize" / "stores.json", tmp_path / "model").entry("el", "train")
    ids = el.path / "ids.npy"
    os.truncate(ids, ids.stat().st_size - 6)
    line = one_error(run_cli(["analyze", str(config)]))
    assert f"token store file {ids} is truncated: " in line
    assert f"; delete {el.path} and run the tokenize stage again" in line
    assert not (g1 / "analyze").exists()
    assert f"token store file {ids} is truncated: " in one_error(run_cli(["tokenize", str(config), "--force"]))
