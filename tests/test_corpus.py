"""Reading corpora in every supported format, deterministic splits, and corpus errors."""

from __future__ import annotations

import json

import pytest

from conftest import synthetic_documents, write_jsonl
from pipeline.corpus import LanguageSource, infer_format, is_heldout, iter_split_documents
from pipeline.errors import LayerMoEError

DOCS = synthetic_documents("el", 60)


def _all(source: LanguageSource, fraction: float = 0.2) -> tuple[list[str], list[str]]:
    documents = list(iter_split_documents(source, fraction, 0))
    return [t for split, t in documents if split == "train"], [t for split, t in documents if split == "heldout"]


def test_formats_read_the_same_documents(tmp_path):
    import datasets

    jsonl = write_jsonl(tmp_path / "el.jsonl", DOCS)
    text = tmp_path / "el.txt"
    text.write_text("\n\n".join(DOCS) + "\n")
    parquet = tmp_path / "el.parquet"
    datasets.Dataset.from_dict({"content": DOCS}).to_parquet(str(parquet))
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(saved))
    sources = [
        LanguageSource("el", jsonl, infer_format(jsonl)),
        LanguageSource("el", text, infer_format(text), text_sample_by="paragraph"),
        LanguageSource("el", parquet, infer_format(parquet), field="content"),
        LanguageSource("el", saved, infer_format(saved)),
    ]
    assert [s.format for s in sources] == ["jsonl", "text", "parquet", "dataset"]
    expected = _all(sources[0])
    assert sorted(expected[0] + expected[1]) == sorted(DOCS)
    for source in sources[1:]:
        train, heldout = _all(source)
        assert train == expected[0] and heldout == expected[1]


def test_split_is_deterministic_disjoint_and_sized():
    texts = synthetic_documents("hu", 2000)
    held = [t for t in texts if is_heldout(t, 0.1, seed=7)]
    assert held == [t for t in texts if is_heldout(t, 0.1, seed=7)]
    assert 150 < len(held) < 250
    assert held != [t for t in texts if is_heldout(t, 0.1, seed=8)]


def test_empty_and_bad_corpora(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(LayerMoEError, match="no non-empty documents"):
        list(iter_split_documents(LanguageSource("tr", empty, "jsonl"), 0.1, 0))
    wrong_field = write_jsonl(tmp_path / "w.jsonl", ["a b c"])
    with pytest.raises(LayerMoEError, match="no field 'body'"):
        list(iter_split_documents(LanguageSource("tr", wrong_field, "jsonl", field="body"), 0.1, 0))
    with pytest.raises(LayerMoEError, match="from its extension"):
        infer_format(tmp_path / "x.csv")


def test_missing_source_file_is_named(tmp_path):
    from pipeline.config import DataConfig, RunConfig, RoundConfig, SourceConfig
    from pipeline.corpus import resolve_source

    config = RunConfig(name="t", old_languages=["en"], rounds=[RoundConfig("g1", ["el"])],
                       data=DataConfig(builtin_corpus="none", sources={"en": SourceConfig(str(tmp_path / "missing.jsonl"))}))
    with pytest.raises(LayerMoEError, match=r"data\.sources\.en\.path: corpus .*missing\.jsonl' does not exist"):
        resolve_source(config, "en")
