"""Evaluation split over ranks: 2 real gloo processes score disjoint blocks and translate disjoint sentences, and
every number equals the one-process result."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.evaluate import score_blocks, translate_chrf
from pipeline.ranks import free_port

BLOCKS = torch.randint(4, 400, (7, 20), generator=torch.Generator().manual_seed(0))  # 7: the ranks get 4 and 3
PAIRS = [(f"sentence number {i} in english", f"reference {i}") for i in range(5)]


def evaluate_here(tokenizer_dir) -> dict:
    """Perplexity and routing of a tiny two-round model (classifier included) on BLOCKS, original and new
    language, plus chrF of greedy 'translations' of PAIRS: in this process, whatever the world size."""
    from test_expert_parallel import two_round_model

    from pipeline.packing import load_tokenizer

    model = two_round_model().eval()
    model.set_classifiers_active(True)  # as a stage-2 model is evaluated
    results = {lang: score_blocks(model, BLOCKS, original, batch_size=2, chunk_tokens=9)
               for lang, original in (("en", True), ("el", False))}
    results["translation"] = translate_chrf(model, load_tokenizer(tokenizer_dir), PAIRS[:1], PAIRS[1:], "Greek", 6)
    return results


def _worker(rank: int, port: int, tokenizer_dir, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        results[rank] = evaluate_here(tokenizer_dir)
    except Exception:
        results[rank] = traceback.format_exc()
        raise
    finally:
        dist.destroy_process_group()


def test_two_ranks_score_like_one_process(tokenizer_dir):
    single = evaluate_here(tokenizer_dir)
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_worker, args=(free_port(), tokenizer_dir, shared), nprocs=2, join=True)
        ranks = [shared[0], shared[1]]
    for rank, result in enumerate(ranks):
        assert isinstance(result, dict), f"rank {rank}: {result}"
        for lang in ("en", "el"):
            expected, got = single[lang], result[lang]
            assert got.tokens == expected.tokens == 7 * 19
            assert got.perplexity == pytest.approx(expected.perplexity, rel=1e-6)
            assert got.routing == expected.routing  # integer counts: exactly
        assert result["translation"] == single["translation"]
    routing = single["en"].routing
    assert sum(routing[1].load) > 0 and routing[1].classifier_accuracy is not None
