"""Tokenizer backends agree; the reference packing (tests/reference_data.py) with per-token language ids."""

from __future__ import annotations

import pytest

from conftest import synthetic_documents
from pipeline.errors import LayerMoEError
from pipeline.packing import load_tokenizer
from reference_data import encode_document, pack_documents


@pytest.mark.parametrize("backend", ["fast", "sentencepiece", "bare-file"])
def test_tokenizer_backends_agree(spm_model, tokenizer_dir, backend):
    if backend == "fast":
        tok = load_tokenizer(tokenizer_dir)
    elif backend == "sentencepiece":
        tok = load_tokenizer(tokenizer_dir, backend="sentencepiece")
    else:
        tok = load_tokenizer(spm_model)
    reference = load_tokenizer(tokenizer_dir, backend="sentencepiece")
    for text in synthetic_documents("tr", 10) + synthetic_documents("el", 10):
        assert encode_document(tok, text) == encode_document(reference, text)
        assert encode_document(tok, text)[-1] == tok.eos_token_id


def test_pack_blocks_and_language_ids(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    languages = ["en", "el"]
    docs = [(i % 2, text) for i, text in enumerate(synthetic_documents("en", 10) + synthetic_documents("el", 10))]
    docs = [(lang, synthetic_documents(languages[lang], 1, seed=i)[0]) for i, (lang, _) in enumerate(docs)]
    packed = pack_documents(docs, tok, block_length=16, languages=languages)
    stream_ids, stream_langs = [], []
    for lang, text in docs:
        ids = encode_document(tok, text)
        stream_ids += ids
        stream_langs += [lang] * len(ids)
    n = len(stream_ids) // 16
    assert packed.input_ids.shape == packed.language_ids.shape == (n, 16)
    assert packed.input_ids.flatten().tolist() == stream_ids[: n * 16]
    assert packed.language_ids.flatten().tolist() == stream_langs[: n * 16]
    assert {0, 1} <= set(packed.language_ids.flatten().tolist())
    assert len(pack_documents(docs, tok, 16, languages, max_blocks=2)) == 2


def test_pack_errors(tokenizer_dir, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    with pytest.raises(LayerMoEError, match="not enough text"):
        pack_documents([(0, "ab")], tok, 512, ["en"])
    with pytest.raises(LayerMoEError, match="does not exist"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerMoEError, match="no tokenizer found"):
        load_tokenizer(tmp_path / "empty")
