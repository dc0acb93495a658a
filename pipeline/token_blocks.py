"""Token stores read the way the stages use them, straight from disk: fixed-length blocks of the token stream
(training, evaluation) and per-document chunks with counted positions (analyze)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from pipeline.errors import LayerMoEError
from pipeline.token_store import TokenStore


class BlockView:
    """Block ``j`` of a store is ``tokens[j * block_length:(j + 1) * block_length]`` of its token stream; a trailing
    partial block is dropped (the blocks of packing the documents' tokens in memory, one after another)."""

    def __init__(self, store: TokenStore, block_length: int):
        if block_length < 2:
            raise LayerMoEError(f"block length must be >= 2, got {block_length}")
        self.store = store
        self.block_length = block_length
        self.num_blocks = store.num_tokens // block_length

    def blocks(self, indices: Iterable[int]) -> np.ndarray:
        """The blocks at ``indices`` (each ``< num_blocks``) as an int64 array ``[len(indices), block_length]``."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_blocks):
            raise IndexError(f"block index out of range: the store has {self.num_blocks} blocks")
        out = np.empty((len(indices), self.block_length), dtype=np.int64)
        for row, j in enumerate(indices):
            out[row] = self.store.tokens(int(j) * self.block_length, (int(j) + 1) * self.block_length)
        return out

    def leading(self, count: int) -> np.ndarray:
        """The first ``min(count, num_blocks)`` blocks, int64 ``[n, block_length]`` (held-out evaluation)."""
        n = min(count, self.num_blocks)
        return self.store.tokens(0, n * self.block_length).astype(np.int64).reshape(n, self.block_length)


@dataclass
class TokenChunk:
    """One forward pass worth of one document's tokens, and which positions count."""

    input_ids: np.ndarray  # int64 [n]
    counted: np.ndarray  # bool [n]


def sample_chunks(store: TokenStore, tokens: int, max_length: int, include_special_tokens: bool,
                  special_ids: Iterable[int]) -> tuple[list[TokenChunk], int]:
    """The analyze sample: documents in order, each alone (the tokenizer's ids, no separator), cut into chunks of
    at most ``max_length`` tokens until exactly ``tokens`` counted tokens are collected or the documents run out.
    Special tokens count only if ``include_special_tokens``. Returns the chunks and the number of counted tokens.
    Truncating the last chunk is exact for a causal model: earlier positions do not see later ones."""
    special = np.array(sorted(special_ids), dtype=np.int64)
    chunks: list[TokenChunk] = []
    total = 0
    for i in range(store.num_documents):
        ids = store.text_ids(i).astype(np.int64)
        for start in range(0, len(ids), max_length):
            piece = ids[start:start + max_length]
            counted = np.ones(len(piece), dtype=np.bool_) if include_special_tokens else ~np.isin(piece, special)
            need = tokens - total
            positions = np.flatnonzero(counted)
            if len(positions) >= need:
                cut = int(positions[need - 1]) + 1
                piece, counted = piece[:cut], counted[:cut]
            chunks.append(TokenChunk(piece, counted))
            total += int(counted.sum())
            if total >= tokens:
                return chunks, total
    return chunks, total
