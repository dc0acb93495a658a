"""analyze stage: per layer, how similar the FFN inputs of the new and old languages are (docs/method.md, 3.1).

Streaming and exact: hooks on every FFN module add the unit-normalised input vectors of the counted
positions into a ``[num_layers, hidden]`` float64 sum per language. The tokens are each language's sample of its
train-split token store (``pipeline.token_blocks.sample_chunks``). Memory does not grow with the number
of tokens; padding never counts; BOS/EOS/other special tokens count only if asked. Under torch.distributed
each rank forwards its share of the chunks and the sums are all-reduced.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline import distributed, log
from pipeline.base_model import ffn_modules
from pipeline.errors import LayerMoEError
from pipeline.token_blocks import TokenChunk, sample_chunks
from pipeline.token_store import TokenStore


def add_unit_vectors(acc: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """``acc[h] += sum_t weight[t] * x[t] / |x[t]|`` over all leading dims of ``x`` (float64 accumulator).

    One matrix-vector product in fp32 per call: no per-token Python work, no copy of ``x`` beyond its unit form.
    """
    hidden = x.shape[-1]
    unit = torch.nn.functional.normalize(x.float(), dim=-1).reshape(-1, hidden)
    acc += (weight.reshape(1, -1).float() @ unit).reshape(hidden).double()


def _batches(chunks: list[TokenChunk], batch_size: int) -> list[list[TokenChunk]]:
    ordered = sorted(chunks, key=lambda c: len(c.input_ids), reverse=True)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.inference_mode()
def accumulate_unit_sums(model: torch.nn.Module, chunks: list[TokenChunk], batch_size: int, pad_id: int,
                         label: str = "") -> torch.Tensor:
    """Sum over counted positions of the unit-normalised FFN input, per layer: ``[num_layers, hidden]`` float64.

    Each rank forwards ``chunks[rank::world_size]``; the result is all-reduced, so every rank returns the total.
    """
    ffns = ffn_modules(model)
    device = next(model.parameters()).device
    hidden = model.config.hidden_size
    sums = torch.zeros(len(ffns), hidden, dtype=torch.float64, device=device)
    dist = distributed.current()
    mine = chunks[dist.rank::dist.world_size]
    weights: dict[str, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            add_unit_vectors(sums[layer], x, weights["mask"])
        return hook

    handles = [ffn.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, ffn in enumerate(ffns)]
    decoder = model.get_decoder()
    total_tokens = sum(int(np.count_nonzero(c.counted)) for c in mine)
    done, started, last_report = 0, time.perf_counter(), time.perf_counter()
    try:
        for batch in _batches(mine, batch_size):
            length = len(batch[0].input_ids)
            ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            attention = torch.zeros(len(batch), length, dtype=torch.long)
            counted = torch.zeros(len(batch), length, dtype=torch.float32)
            for row, chunk in enumerate(batch):
                n = len(chunk.input_ids)
                ids[row, :n] = torch.as_tensor(chunk.input_ids, dtype=torch.long)
                attention[row, :n] = 1
                counted[row, :n] = torch.as_tensor(chunk.counted, dtype=torch.float32)
            weights["mask"] = counted.to(device)
            decoder(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
            done += int(counted.sum())
            now = time.perf_counter()
            if now - last_report > 10 or done == total_tokens:
                rate = done / max(now - started, 1e-9)
                eta = (total_tokens - done) / max(rate, 1e-9)
                log.info(f"analyze {label}: {done:,}/{total_tokens:,} tokens on this rank, "
                         f"{rate:,.0f} tok/s, ETA {eta:.0f}s")
                last_report = now
    finally:
        for h in handles:
            h.remove()
    return distributed.all_reduce_sum(sums)


def language_means(model: torch.nn.Module, tokenizer, stores: dict[str, TokenStore], tokens_per_language: int,
                   max_length: int, batch_size: int, include_special_tokens: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Mean unit FFN-input vector per language and layer over the first ``tokens_per_language`` counted tokens of
    each language's store (see ``sample_chunks``), and the number of tokens each mean is over. ``tokenizer`` (the
    stores' tokenizer) gives the padding and special token ids."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    means, counts = {}, {}
    for i, (lang, store) in enumerate(stores.items()):
        chunks, count = sample_chunks(store, tokens_per_language, max_length, include_special_tokens,
                                      tokenizer.all_special_ids)
        if count == 0:
            raise LayerMoEError(f"language {lang!r}: no tokens to analyse (empty training split?)")
        if count < tokens_per_language:
            log.warn(f"language {lang!r}: only {count:,} tokens available, fewer than the requested "
                     f"{tokens_per_language:,}; using {count:,}")
        sums = accumulate_unit_sums(model, chunks, batch_size, pad_id, label=f"{lang} ({i + 1}/{len(stores)})")
        means[lang] = (sums / count).cpu()
        counts[lang] = count
    return means, counts
