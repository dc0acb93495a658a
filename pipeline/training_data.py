"""Training data of the two stages: packed blocks with a language id per token, in a deterministic order
that depends only on (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.

* stage 1: the round's new languages only.
* stage 2: the new languages plus replay of every earlier language (original + earlier rounds).
Each language is packed on its own (blocks are single-language, so a block has one classifier label) and
the blocks of all languages are shuffled together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline import log
from pipeline.config import RunConfig, TrainingStage
from pipeline.corpus import language_documents
from pipeline.errors import LayerMoEError
from pipeline.packing import PackedBlocks, iter_packed


@dataclass
class StageData:
    blocks: PackedBlocks
    original: torch.Tensor  # [num_languages] bool: the language is one of the base model's

    def original_mask(self, language_ids: torch.Tensor) -> torch.Tensor:
        return self.original[language_ids]


def stage_languages(config: RunConfig, round_index: int,
                    training_stage: TrainingStage) -> tuple[list[str], dict[str, int]]:
    """Languages of a training stage and the token budget of each."""
    settings = config.train.for_stage(training_stage)
    new = list(config.rounds[round_index].languages)
    budget = {lang: settings.tokens_per_language for lang in new}
    if training_stage == 2 and settings.replay_tokens_per_language > 0:
        budget.update({lang: settings.replay_tokens_per_language for lang in config.languages_before(round_index)})
    return list(budget), budget


def build_stage_data(config: RunConfig, round_index: int, training_stage: TrainingStage, tokenizer) -> StageData:
    """Pack every language of the training stage (train split) and shuffle the blocks with the run's seed."""
    settings = config.train.for_stage(training_stage)
    languages, budget = stage_languages(config, round_index, training_stage)
    ids, langs = [], []
    for index, lang in enumerate(languages):
        max_blocks = max(1, budget[lang] // settings.block_length)
        docs = ((index, text) for text in language_documents(config, lang, "train"))
        count = 0
        for block_ids, block_langs in iter_packed(docs, tokenizer, settings.block_length):
            ids.append(block_ids)
            langs.append(block_langs)
            count += 1
            if count >= max_blocks:
                break
        if count == 0:
            raise LayerMoEError(f"language {lang!r} has too little text for one block of {settings.block_length} tokens")
        if count < max_blocks:
            log.warn(f"language {lang!r}: {count * settings.block_length:,} tokens available for stage {training_stage}, "
                     f"fewer than the requested {budget[lang]:,}")
        log.info(f"stage {training_stage} data: {lang} {count} blocks x {settings.block_length} tokens")
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(config.seed))
    blocks = PackedBlocks(torch.tensor(ids)[order], torch.tensor(langs)[order], languages)
    original = torch.tensor([lang in config.old_languages for lang in languages])
    return StageData(blocks, original)


def micro_batch_indices(num_blocks: int, step: int, micro: int, accumulation: int, rank: int, world: int,
                        batch_size: int) -> torch.Tensor:
    """Block indices of one rank's micro-batch: consecutive slices of an endless walk through the blocks."""
    start = ((step * accumulation + micro) * world + rank) * batch_size
    return torch.arange(start, start + batch_size) % num_blocks
