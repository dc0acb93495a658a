"""Training data of the two stages: fixed-length blocks of the languages' token stores (``pipeline/token_blocks.py``)
with a language id per token, in a deterministic order that depends only on (seed, step), so a resumed run sees
exactly the batches an uninterrupted one would. Each rank reads only the rows of its own micro-batches.

* stage 1: the round's new languages only.
* stage 2: the new languages plus replay of every earlier language (original + earlier rounds).
Each language is packed on its own (blocks are single-language, so a block has one classifier label) and
the blocks of all languages are shuffled together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline import log
from pipeline.config import RunConfig, TrainingStage
from pipeline.errors import LayerMoEError
from pipeline.token_blocks import BlockView
from pipeline.token_store import TokenStore


def stage_languages(config: RunConfig, round_index: int,
                    training_stage: TrainingStage) -> tuple[list[str], dict[str, int]]:
    """Languages of a training stage and the token budget of each."""
    settings = config.train.for_stage(training_stage)
    new = list(config.rounds[round_index].languages)
    budget = {lang: settings.tokens_per_language for lang in new}
    if training_stage == 2 and settings.replay_tokens_per_language > 0:
        budget.update({lang: settings.replay_tokens_per_language for lang in config.languages_before(round_index)})
    return list(budget), budget


def micro_batch_indices(num_blocks: int, step: int, micro: int, accumulation: int, rank: int, world: int,
                        batch_size: int) -> torch.Tensor:
    """Block indices of one rank's micro-batch: consecutive slices of an endless walk through the blocks."""
    start = ((step * accumulation + micro) * world + rank) * batch_size
    return torch.arange(start, start + batch_size) % num_blocks


@dataclass
class MicroBatch:
    index: torch.Tensor  # [batch] the global block indices (micro_batch_indices)
    input_ids: torch.Tensor  # [batch, block_length] int64
    language_ids: torch.Tensor  # [batch, block_length] int64: the block's language index on every token


class StageMix:
    """The blocks of several languages' token stores, shuffled together and read from the stores on demand.

    Language ``i`` contributes ``counts[i]`` blocks: its blocks in stream order, repeated (epochs) when it has fewer.
    Global block ``g`` is ``order[g]`` of those blocks concatenated language after language, ``order`` a permutation
    seeded with ``seed`` (8 bytes of memory per block; the order of packing every language's text in memory and
    shuffling the blocks, as tests/reference_data.py does).
    """

    def __init__(self, languages: list[str], views: list[BlockView], counts: list[int], seed: int,
                 original: torch.Tensor):
        if any(view.num_blocks == 0 for view in views):
            raise LayerMoEError("every language of a stage mix needs at least one block")
        self.languages = list(languages)
        self.views = views
        self.counts = list(counts)
        self.original = original
        self._starts = np.cumsum([0] + self.counts, dtype=np.int64)
        self.order = torch.randperm(int(self._starts[-1]), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(language index, block of that language's store) of the global blocks ``index``."""
        k = self.order[index].numpy()
        language = np.searchsorted(self._starts, k, side="right") - 1
        available = np.array([view.num_blocks for view in self.views], dtype=np.int64)
        return language, (k - self._starts[language]) % available[language]

    def micro_batch(self, step: int, micro: int, accumulation: int, rank: int, world: int,
                    batch_size: int) -> MicroBatch:
        """One rank's micro-batch (``micro_batch_indices``), read from the stores: only these rows are touched."""
        index = micro_batch_indices(len(self), step, micro, accumulation, rank, world, batch_size)
        language, block = self.locate(index)
        length = self.views[0].block_length
        ids = np.empty((len(index), length), dtype=np.int64)
        for row, (lang, j) in enumerate(zip(language, block)):
            ids[row] = self.views[lang].blocks([j])[0]
        return MicroBatch(index, torch.from_numpy(ids), torch.from_numpy(language).reshape(-1, 1).expand(-1, length))

    def original_mask(self, language_ids: torch.Tensor) -> torch.Tensor:
        return self.original[language_ids]


def build_stage_mix(config: RunConfig, round_index: int, stage: TrainingStage,
                    stores: dict[str, TokenStore]) -> StageMix:
    """The stage's training blocks from the train-split stores of its languages (by language): ``tokens_per_language
    // block_length`` blocks per language (at least one); a language with less text repeats, with a warning."""
    settings = config.train.for_stage(stage)
    languages, budget = stage_languages(config, round_index, stage)
    views, counts = [], []
    for lang in languages:
        view = BlockView(stores[lang], settings.block_length)
        wanted = max(1, budget[lang] // settings.block_length)
        if view.num_blocks == 0:
            raise LayerMoEError(f"language {lang!r} has too little text for one block of {settings.block_length} tokens")
        if view.num_blocks < wanted:
            log.warn(f"language {lang!r}: {view.num_blocks * settings.block_length:,} tokens available for stage "
                     f"{stage}, fewer than the requested {budget[lang]:,}; repeating them "
                     f"({wanted / view.num_blocks:.1f} epochs)")
        log.info(f"stage {stage} data: {lang} {wanted} blocks x {settings.block_length} tokens")
        views.append(view)
        counts.append(wanted)
    original = torch.tensor([lang in config.old_languages for lang in languages])
    return StageMix(languages, views, counts, config.seed, original)
