"""The simple in-memory data paths, kept as references for the token stores the pipeline reads: tokenize each
document on its own, pack the tokens into blocks in Python lists, shuffle the blocks. Slow and memory-hungry (about
70 bytes of RAM per token), exact. The tests check the stores, the stage mix, the analyze sample and the held-out
blocks against these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from pipeline.config import RunConfig, TrainingStage
from pipeline.corpus import LanguageSource, Split, iter_split_documents, resolve_source
from pipeline.errors import LayerMoEError
from pipeline.packing import needs_separator
from pipeline.training_data import stage_languages


def split_documents(source: LanguageSource, split: Split, heldout_fraction: float, seed: int) -> Iterator[str]:
    """The documents of one split, in corpus order."""
    return (text for side, text in iter_split_documents(source, heldout_fraction, seed) if side == split)


def language_documents(config: RunConfig, language: str, split: Split) -> Iterator[str]:
    """The documents of ``language``'s ``split`` as ``config`` sets the source and the split."""
    return split_documents(resolve_source(config, language), split, config.data.heldout_fraction,
                           config.data.split_seed)


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


def iter_packed(documents: Iterable[tuple[int, str]], tokenizer,
                block_length: int) -> Iterator[tuple[list[int], list[int]]]:
    """``(input_ids, language_ids)`` blocks of exactly ``block_length`` tokens from ``(language_index, text)``
    documents, concatenated in order; a trailing partial block is dropped."""
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


@dataclass
class StageData:
    blocks: PackedBlocks
    original: torch.Tensor  # [num_languages] bool: the language is one of the base model's

    def original_mask(self, language_ids: torch.Tensor) -> torch.Tensor:
        return self.original[language_ids]


def build_stage_data(config: RunConfig, round_index: int, training_stage: TrainingStage, tokenizer) -> StageData:
    """A training stage's blocks: each language's train split packed up to its budget (repeated when it has fewer
    blocks: the stage mix's epochs), the blocks of all languages shuffled with the run's seed."""
    settings = config.train.for_stage(training_stage)
    languages, budget = stage_languages(config, round_index, training_stage)
    ids, langs = [], []
    for index, lang in enumerate(languages):
        wanted = max(1, budget[lang] // settings.block_length)
        docs = ((index, text) for text in language_documents(config, lang, "train"))
        blocks = []
        for block in iter_packed(docs, tokenizer, settings.block_length):
            blocks.append(block)
            if len(blocks) >= wanted:
                break
        for j in range(wanted):
            ids.append(blocks[j % len(blocks)][0])
            langs.append(blocks[j % len(blocks)][1])
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(config.seed))
    blocks = PackedBlocks(torch.tensor(ids)[order], torch.tensor(langs)[order], languages)
    return StageData(blocks, torch.tensor([lang in config.old_languages for lang in languages]))


def heldout_blocks(config: RunConfig, languages: list[str], tokenizer) -> dict[str, torch.Tensor]:
    """Per language, up to ``evaluate.tokens_per_language`` held-out tokens in blocks ``[n, block_length]``."""
    e = config.evaluate
    return {lang: pack_documents(((0, text) for text in language_documents(config, lang, "heldout")), tokenizer,
                                 e.block_length, [lang], max(1, e.tokens_per_language // e.block_length)).input_ids
            for lang in languages}


@dataclass
class Chunk:
    """One forward pass worth of tokens, and which of its positions count."""

    input_ids: list[int]
    counted: list[bool]


def token_chunks(documents: Iterable[str], tokenizer, tokens_per_language: int, max_length: int,
                 include_special_tokens: bool) -> tuple[list[Chunk], int]:
    """The analyze sample: documents in order, each tokenized alone, cut into chunks of at most ``max_length``
    tokens until exactly ``tokens_per_language`` counted tokens are collected (or the documents run out)."""
    special = set(tokenizer.all_special_ids)
    chunks: list[Chunk] = []
    total = 0
    for text in documents:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(0, len(ids), max_length):
            piece = ids[start:start + max_length]
            counted = [include_special_tokens or t not in special for t in piece]
            need = tokens_per_language - total
            if sum(counted) >= need:
                cut = [i for i, c in enumerate(counted) if c][need - 1] + 1
                piece, counted = piece[:cut], counted[:cut]
            chunks.append(Chunk(piece, counted))
            total += sum(counted)
            if total >= tokens_per_language:
                return chunks, total
    return chunks, total
