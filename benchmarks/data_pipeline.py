"""The data pipeline at scale: tokenizing into token stores, and what a training process holds while reading them.

Builds one jsonl per language (el, hu, tr) from the built-in LibreOffice corpus, its documents repeated in shuffled
order until each language has about ``--tokens-per-language`` tokens for training (at least 300 MB in all), in a
temporary directory. Then, in one run:

* tokenize throughput: today's path (``packing.encode_document`` per document in one process, one pass over each
  source), then ``tokenize_corpus`` with 1 and with 2 worker processes (fresh caches; the fork server warmed on a
  tiny corpus first). The stores' token streams are checked equal to today's path (sha256 per language and split).
* bytes on disk per token of the stores.
* a training process (a fresh ``python`` per budget) that opens the warm stores, builds the stage-1 mix and reads
  micro-batches spread over the whole mix: peak RSS at ``--small-tokens`` and at ``--tokens-per-language`` per
  language, and the time from opening the stores to the first micro-batch.

    python benchmarks/data_pipeline.py                                   # 50M tokens per language (~7 min on 2 cores)
    python benchmarks/data_pipeline.py --tokens-per-language 10000000    # a quicker look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.config import (DataConfig, RoundConfig, RunConfig, SourceConfig, StageTrainConfig, TrainConfig,
                             default_cache_dir)
from pipeline.corpus import LanguageSource, iter_split_documents

LANGUAGES = ("el", "hu", "tr")
HELDOUT_FRACTION = 0.05


def bench_config(sources: dict[str, Path], cache_dir: Path, workers: int | None = None, tokens: int = 1,
                 block: int = 1024, batch: int = 8) -> RunConfig:
    return RunConfig(
        name="bench", old_languages=["en"], rounds=[RoundConfig("g1", list(LANGUAGES))], cache_dir=str(cache_dir),
        data=DataConfig(builtin_corpus="none", sources={lang: SourceConfig(str(p)) for lang, p in sources.items()},
                        heldout_fraction=HELDOUT_FRACTION, tokenize_workers=workers),
        train=TrainConfig(stage1=StageTrainConfig(block_length=block, micro_batch_size=batch, tokens_per_language=tokens)))


def make_sources(corpus_docs: dict[str, Path], tokenizer, tokens_per_language: int, min_bytes: int,
                 out: Path) -> dict[str, Path]:
    """Per language, the built-in documents repeated (each copy shuffled) until about ``tokens_per_language``
    training tokens (estimated from one copy), scaled up so that all files together hold >= ``min_bytes``."""
    from pipeline.packing import encode_document

    lines, per_copy = {}, {}
    for lang, path in corpus_docs.items():
        lines[lang] = path.read_text().splitlines(keepends=True)
        texts = (json.loads(line)["text"] for line in lines[lang])
        per_copy[lang] = sum(len(encode_document(tokenizer, t)) for t in texts if t.strip())
    copies = {lang: -(-tokens_per_language // int(per_copy[lang] * (1 - HELDOUT_FRACTION))) for lang in lines}
    total = sum(copies[lang] * sum(len(line.encode()) for line in lines[lang]) for lang in lines)
    scale = max(1.0, min_bytes / total)
    sources = {}
    for lang in lines:
        sources[lang] = out / f"{lang}.jsonl"
        rng = random.Random(lang)
        with sources[lang].open("w") as f:
            for _ in range(int(np.ceil(copies[lang] * scale))):
                shuffled = list(lines[lang])
                rng.shuffle(shuffled)
                f.writelines(shuffled)
    return sources


def todays_path(sources: dict[str, Path], tokenizer) -> tuple[float, int, dict[str, str]]:
    """encode_document per document in this process, one pass per source: (seconds, tokens, digest per split)."""
    from pipeline.packing import encode_document

    digests = {}
    tokens = 0
    start = time.perf_counter()
    for lang, path in sources.items():
        for split, text in iter_split_documents(LanguageSource(lang, path, "jsonl"), HELDOUT_FRACTION, 0):
            ids = encode_document(tokenizer, text)
            tokens += len(ids)
            digests.setdefault(f"{lang}-{split}", hashlib.sha256()).update(np.asarray(ids, dtype=np.uint32).tobytes())
    return time.perf_counter() - start, tokens, {k: h.hexdigest() for k, h in digests.items()}


def store_digest(store) -> str:
    h = hashlib.sha256()
    step = 1 << 24
    for start in range(0, store.num_tokens, step):
        h.update(store.tokens(start, min(start + step, store.num_tokens)).astype(np.uint32).tobytes())
    return h.hexdigest()


def tokenize_with(sources: dict[str, Path], model: Path, cache_dir: Path, workers: int):
    from pipeline.tokenize_corpus import language_stores

    config = bench_config(sources, cache_dir, workers)
    start = time.perf_counter()
    stores = language_stores(config, {lang: ("train", "heldout") for lang in sources}, model)
    return time.perf_counter() - start, stores


def memory_status(field: str) -> int:
    """A ``/proc/self/status`` memory figure in bytes: VmRSS (now), RssFile (of it, file pages mapped in) or VmHWM
    (peak of this program, not counting the parent it was forked from, unlike ``ru_maxrss``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reader(args: argparse.Namespace) -> None:
    """(A child process) open the warm stores, build the stage-1 mix, read micro-batches; print JSON."""
    from pipeline.tokenize_corpus import language_stores
    from pipeline.training_data import build_stage_mix

    imported = memory_status("VmRSS")
    sources = {lang: Path(args.work) / f"{lang}.jsonl" for lang in LANGUAGES}
    config = bench_config(sources, Path(args.work) / "cache-2", None, args.tokens, args.block, args.batch)
    start = time.perf_counter()
    stores = language_stores(config, {lang: ("train",) for lang in LANGUAGES}, Path(args.model))
    mix = build_stage_mix(config, 0, 1, {lang: stores[(lang, "train")] for lang in LANGUAGES})
    mix.micro_batch(0, 0, 1, 0, 1, args.batch)
    first = time.perf_counter() - start
    reads = 200
    stride = max(1, len(mix) // (args.batch * reads))  # steps spread over the whole mix
    start = time.perf_counter()
    for i in range(reads):
        mix.micro_batch(i * stride, 0, 1, 0, 1, args.batch)
    per_batch = (time.perf_counter() - start) / reads
    print(json.dumps({"blocks": len(mix), "first_batch_s": first, "batch_ms": per_batch * 1e3,
                      "rss_after_imports": imported, "peak_rss": memory_status("VmHWM"),
                      "rss_file": memory_status("RssFile")}))


def run_reader(work: Path, model: Path, tokens: int, block: int, batch: int) -> dict:
    cmd = [sys.executable, __file__, "reader", "--work", str(work), "--model", str(model), "--tokens", str(tokens),
           "--block", str(block), "--batch", str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MASTER_ADDR": "127.0.0.1"})
    if proc.returncode != 0:
        sys.exit(f"reader failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "reader"])
    parser.add_argument("--tokens-per-language", type=int, default=50_000_000)
    parser.add_argument("--small-tokens", type=int, default=5_000_000)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-total-mb", type=int, default=300, help="size of the generated corpus at least")
    parser.add_argument("--work", help="(reader) the benchmark's directory")
    parser.add_argument("--model", help="(reader) the tokenizer's model directory")
    parser.add_argument("--tokens", type=int, help="(reader) tokens per language")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpus and stores")
    args = parser.parse_args()
    if args.mode == "reader":
        reader(args)
        return

    from pipeline.default_model import ensure_default_model
    from pipeline.libreoffice_corpus import build_libreoffice_corpus
    from pipeline.packing import load_tokenizer
    from pipeline.tokenize_corpus import language_stores

    cache = default_cache_dir()
    model = ensure_default_model(cache)
    corpus = build_libreoffice_corpus(LANGUAGES, cache)
    tokenizer = load_tokenizer(model)
    work = Path(tempfile.mkdtemp(prefix="layermoe-data-bench-"))
    try:
        print(f"generating the corpus in {work} ...", flush=True)
        sources = make_sources({lang: corpus.documents_path(lang) for lang in LANGUAGES}, tokenizer,
                               args.tokens_per_language, args.min_total_mb * 2**20, work)
        source_bytes = sum(p.stat().st_size for p in sources.values())
        print("tokenizing: today's path ...", flush=True)
        today_s, today_tokens, today_digests = todays_path(sources, tokenizer)
        load = {"today": os.getloadavg()[0]}
        warm = {"el": work / "warmup" / "el.jsonl"}  # start the fork server outside the timings
        warm["el"].parent.mkdir()
        warm["el"].write_text("".join(corpus.documents_path("el").read_text().splitlines(keepends=True)[:300]))
        language_stores(bench_config(warm, work / "warmup" / "cache", 2), {"el": ("train",)}, model)
        runs = {}
        for workers in (1, 2):
            print(f"tokenizing: {workers} worker(s) ...", flush=True)
            runs[workers] = tokenize_with(sources, model, work / f"cache-{workers}", workers)
            load[workers] = os.getloadavg()[0]
        for workers, (_, stores) in runs.items():
            for (lang, split), store in stores.items():
                if store_digest(store) != today_digests[f"{lang}-{split}"]:
                    sys.exit(f"MISMATCH: the {workers}-worker store of {lang} {split} differs from today's path")
        stores = runs[2][1]
        tokens = sum(s.num_tokens for s in stores.values())
        assert tokens == today_tokens
        disk = sum(f.stat().st_size for s in stores.values() for f in s.path.rglob("*") if f.is_file())
        train_tokens = {lang: stores[(lang, "train")].num_tokens for lang in LANGUAGES}
        print("reading: a training process at each budget ...", flush=True)
        small = run_reader(work, model, args.small_tokens, args.block, args.batch)
        large = run_reader(work, model, args.tokens_per_language, args.block, args.batch)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    mib = 2**20
    print(f"\ncorpus: {source_bytes / mib:,.0f} MiB of jsonl (el, hu, tr), {tokens:,} tokens with the SmolLM2 tokenizer; "
          f"train tokens per language: {', '.join(f'{k} {v:,}' for k, v in train_tokens.items())}; "
          f"{os.cpu_count()} cores")
    print("token streams of both worker counts equal today's path (sha256 per language and split)\n")
    print(f"{'tokenize':<34}{'seconds':>10}{'tokens/s':>14}{'vs today':>10}{'vs 1 worker':>13}"
          f"{'load avg (1 min) at end':>25}")
    rows = [("today's path (encode_document)", today_s, load["today"])] + [
        (f"token store, {w} worker(s)", runs[w][0], load[w]) for w in (1, 2)]
    for name, seconds, load_average in rows:
        print(f"{name:<34}{seconds:>10.1f}{tokens / seconds:>14,.0f}{today_s / seconds:>9.2f}x"
              f"{runs[1][0] / seconds:>12.2f}x{load_average:>25.1f}")
    print(f"\nbytes on disk per token: {disk / tokens:.3f} (token ids {stores[('el', 'train')].meta.dtype}, "
          f"document offsets and separator flags included; {disk / mib:,.0f} MiB for {tokens:,} tokens)\n")
    print(f"{'training process (stage-1 mix, 3 languages)':<46}{'blocks':>10}{'RSS after imports MiB':>23}"
          f"{'peak RSS MiB':>14}{'file-backed at end':>20}{'open->1st batch s':>19}{'ms/micro-batch':>16}")
    for budget, r in ((args.small_tokens, small), (args.tokens_per_language, large)):
        print(f"{f'{budget:,} tokens per language':<46}{r['blocks']:>10,}{r['rss_after_imports'] / mib:>23.1f}"
              f"{r['peak_rss'] / mib:>14.1f}{r['rss_file'] / mib:>20.1f}{r['first_batch_s']:>19.2f}"
              f"{r['batch_ms']:>16.2f}")
    print(f"peak RSS difference: {(large['peak_rss'] - small['peak_rss']) / mib:.1f} MiB (goal < 100); "
          f"2 workers vs 1: {runs[1][0] / runs[2][0]:.2f}x (goal >= 1.7); "
          f"open -> first micro-batch at {args.tokens_per_language:,}: {large['first_batch_s']:.2f} s (goal < 5)")


if __name__ == "__main__":
    main()
