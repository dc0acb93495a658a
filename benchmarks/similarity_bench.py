"""Streaming similarity (mean unit vectors, docs/method.md, 3.1) vs the reference approach (a full N x N cosine
matrix per language pair, each language re-normalised for every pair), on the same hidden states.

Prints, for each N (tokens per language): wall time and peak extra memory of both methods, the speed-up
ratio, and the largest absolute difference between their similarities. Each measurement runs in its own
process so peak memory is that method's alone. One layer of SmolLM2 width by default; a real run repeats
this per layer.

    python benchmarks/similarity_bench.py                 # N = 1K, 5K, 10K, 20K; 4 languages (6 pairs)
    python benchmarks/similarity_bench.py --sizes 2000 --languages 3
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import resource
import time

import torch

from pipeline.analyze import add_unit_vectors


def hidden_states(n: int, hidden: int, languages: int, seed: int = 0) -> list[torch.Tensor]:
    """Per language, ``n`` token vectors with a language-specific offset (so similarities differ)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, hidden, generator=g) + 0.3 * torch.randn(hidden, generator=g) for _ in range(languages)]


def reference(states: list[torch.Tensor]) -> dict[tuple[int, int], float]:
    out = {}
    for a, b in itertools.combinations(range(len(states)), 2):
        ua = torch.nn.functional.normalize(states[a], dim=-1)
        ub = torch.nn.functional.normalize(states[b], dim=-1)
        out[(a, b)] = (ua @ ub.T).mean().item()
    return out


def streaming(states: list[torch.Tensor], batch_tokens: int = 4096) -> dict[tuple[int, int], float]:
    """The pipeline's own accumulation (``pipeline.analyze.add_unit_vectors``), fed in batches as the hooks are."""
    means = []
    for s in states:
        acc = torch.zeros(s.shape[1], dtype=torch.float64)
        for start in range(0, s.shape[0], batch_tokens):
            batch = s[start:start + batch_tokens]
            add_unit_vectors(acc, batch, torch.ones(batch.shape[0]))
        means.append(acc / s.shape[0])
    return {(a, b): float(means[a] @ means[b]) for a, b in itertools.combinations(range(len(states)), 2)}


def _measure(method: str, n: int, hidden: int, languages: int, queue) -> None:
    torch.set_num_threads(torch.get_num_threads())
    states = hidden_states(n, hidden, languages)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    values = {"reference": reference, "streaming": streaming}[method](states)
    seconds = time.perf_counter() - start
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    queue.put((seconds, peak, values))


def measure(method: str, n: int, hidden: int, languages: int):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(method, n, hidden, languages, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000, 20000])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--languages", type=int, default=4)
    args = parser.parse_args()
    pairs = args.languages * (args.languages - 1) // 2
    print(f"hidden={args.hidden} languages={args.languages} ({pairs} pairs) torch threads={torch.get_num_threads()}")
    print(f"{'N':>7} {'reference s':>12} {'ref peak MiB':>13} {'streaming s':>12} {'str peak MiB':>13} "
          f"{'speed-up':>10} {'max |diff|':>11}")
    for n in args.sizes:
        ref_s, ref_mem, ref_vals = measure("reference", n, args.hidden, args.languages)
        str_s, str_mem, str_vals = measure("streaming", n, args.hidden, args.languages)
        diff = max(abs(ref_vals[k] - str_vals[k]) for k in ref_vals)
        print(f"{n:>7} {ref_s:>12.3f} {ref_mem / 2**20:>13.1f} {str_s:>12.4f} {str_mem / 2**20:>13.1f} "
              f"{ref_s / str_s:>9.0f}x {diff:>11.2e}", flush=True)


if __name__ == "__main__":
    main()
