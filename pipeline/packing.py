"""Tokenisation and packing of documents into fixed-length blocks with a language id on every token.

The language ids travel with the tokens so that later losses (language-prior, classifier) know, per token,
which language it belongs to, even when a block spans documents of several languages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

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
    """Whether a document's tokenizer output gets an EOS appended as the separator (see ``encode_document``)."""
    return eos_token_id is not None and (not ids or ids[-1] != eos_token_id)


def encode_document(tokenizer, text: str) -> list[int]:
    """Token ids of one document: BOS if the tokenizer adds one, the text, then EOS as a separator."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if needs_separator(ids, tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class PackedBlocks:
    """``input_ids`` and ``language_ids`` are both ``[num_blocks, block_length]`` int64."""

    input_ids: torch.Tensor
    language_ids: torch.Tensor
    languages: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def iter_packed(documents: Iterable[tuple[int, str]], tokenizer, block_length: int) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``(input_ids, language_ids)`` blocks of exactly ``block_length`` tokens from
    ``(language_index, text)`` documents, concatenated in order; a trailing partial block is dropped."""
    if block_length < 2:
        raise LayerMoEError(f"block length must be >= 2, got {block_length}")
    ids: list[int] = []
    langs: list[int] = []
    for lang, text in documents:
        doc = encode_document(tokenizer, text)
        ids += doc
        langs += [lang] * len(doc)
        while len(ids) >= block_length:
            yield ids[:block_length], langs[:block_length]
            ids, langs = ids[block_length:], langs[block_length:]


def pack_documents(documents: Iterable[tuple[int, str]], tokenizer, block_length: int, languages: list[str],
                   max_blocks: int | None = None) -> PackedBlocks:
    """Pack ``(language_index, text)`` documents into at most ``max_blocks`` blocks (see ``iter_packed``)."""
    input_ids, language_ids = [], []
    for block_ids, block_langs in iter_packed(documents, tokenizer, block_length):
        input_ids.append(block_ids)
        language_ids.append(block_langs)
        if max_blocks is not None and len(input_ids) >= max_blocks:
            break
    if not input_ids:
        raise LayerMoEError(f"not enough text for a single block of {block_length} tokens ({languages})")
    return PackedBlocks(torch.tensor(input_ids, dtype=torch.long), torch.tensor(language_ids, dtype=torch.long),
                        list(languages))
