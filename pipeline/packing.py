"""Tokenizers: loading one (HF directory or SentencePiece model), and the rule by which a document's tokens are
separated from the next one's in a token stream (``needs_separator``; the streams are made by
``pipeline/tokenize_corpus.py`` and cut into blocks by ``pipeline/token_blocks.py``).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import LayerMoEError


def load_tokenizer(path: str | Path, backend: str = "auto"):
    """Load a tokenizer from an HF directory, or from a SentencePiece ``tokenizer.model`` (file or directory).

    ``backend``: ``auto`` (fast ``tokenizers`` backend where it can be built, converting a bare SentencePiece
    model), ``sentencepiece`` (the slow Python SentencePiece backend; needs a ``tokenizer.model``).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise LayerMoEError(f"tokenizer path {str(path)!r} does not exist")
    spm_file = path if path.is_file() else path / "tokenizer.model"
    if backend == "sentencepiece" or path.is_file():
        if not spm_file.is_file():
            raise LayerMoEError(f"no SentencePiece tokenizer.model at {str(path)!r}")
        return _sentencepiece_tokenizer(spm_file)
    known = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((path / name).exists() for name in known):
        raise LayerMoEError(f"no tokenizer found in {str(path)!r} (expected one of {', '.join(known)})")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise LayerMoEError(f"cannot load the tokenizer in {str(path)!r}: {e}") from e


def _sentencepiece_tokenizer(model_file: Path):
    import sentencepiece
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    special = {name: sp.id_to_piece(i) for name, i in
               (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id()))
               if i >= 0}
    return SentencePieceBackend(vocab_file=str(model_file), **special)


def needs_separator(ids: list[int], eos_token_id: int | None) -> bool:
    """Whether a document's tokenizer output (BOS if the tokenizer adds one, the text) gets an EOS appended as the
    separator from the next document: unless it already ends with EOS."""
    return eos_token_id is not None and (not ids or ids[-1] != eos_token_id)
