"""The data pipeline at scale: tokenizing into token stores, and what a training process holds while reading them.

Builds one jsonl per language (el, hu, tr) from the built-in LibreOffice corpus, its documents repeated in shuffled
order until each language has about ``--tokens-per-language`` tokens for training (at least 300 MB in all), in a
temporary directory. Then, in one run:

* tokenize throughput: the in-memory path the stages used before the token stores (``encode_document`` of
  ``tests/reference_data.py`` per document in one process, one pass over each source), then ``tokenize_corpus``
  with 1 and with 2 worker processes (fresh caches; the fork server warmed on a tiny corpus first). The stores'
  token streams are checked equal to the in-memory path's (sha256 per language and split).
* bytes on disk per token of the stores.
* a reader process (a fresh ``python`` per budget) that opens the warm stores through a ``stores.json``, builds the
  stage-1 mix and reads micro-batches spread over the whole mix: peak RSS at ``--small-tokens`` and at
  ``--tokens-per-language`` per language, and the time from reading stores.json to the first micro-batch.
* a training stage's start with the warm stores (a fresh ``python`` per budget): a run of a tiny upcycled Llama with
  SmolLM2's tokenizer whose tokenize stage finds the stores in the cache; the real ``train.build_engine`` (model,
  data from stores.json, DeepSpeed engine) and the first ``train.train_step``, timed, with the data part alone.

    python benchmarks/data_pipeline.py                                   # 50M tokens per language (~15 min on 2 cores)
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
from pipeline.memory import process_status_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from reference_data import encode_document  # noqa: E402  (the in-memory path, kept as the tests' reference)

LANGUAGES = ("el", "hu", "tr")
HELDOUT_FRACTION = 0.05
TRAIN_MICRO_BATCH = 2  # sequences of --block tokens per micro-batch in the training-start measurement


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


def in_memory_path(sources: dict[str, Path], tokenizer) -> tuple[float, int, dict[str, str]]:
    """encode_document per document in this process, one pass per source: (seconds, tokens, digest per split)."""
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


def reader(args: argparse.Namespace) -> None:
    """(A child process) read the stores through stores.json, build the stage-1 mix, read micro-batches; print JSON."""
    from pipeline.store_index import StoreIndex
    from pipeline.training_data import build_stage_mix

    imported = process_status_bytes("VmRSS")
    sources = {lang: Path(args.work) / f"{lang}.jsonl" for lang in LANGUAGES}
    config = bench_config(sources, Path(args.work) / "cache-2", None, args.tokens, args.block, args.batch)
    start = time.perf_counter()
    index = StoreIndex.read(Path(args.work) / "stores.json", Path(args.model))
    mix = build_stage_mix(config, 0, 1, index.open_all(list(LANGUAGES), "train"))
    mix.micro_batch(0, 0, 1, 0, 1, args.batch)
    first = time.perf_counter() - start
    reads = 200
    stride = max(1, len(mix) // (args.batch * reads))  # steps spread over the whole mix
    start = time.perf_counter()
    for i in range(reads):
        mix.micro_batch(i * stride, 0, 1, 0, 1, args.batch)
    per_batch = (time.perf_counter() - start) / reads
    print(json.dumps({"blocks": len(mix), "first_batch_s": first, "batch_ms": per_batch * 1e3,
                      "rss_after_imports": imported, "peak_rss": process_status_bytes("VmHWM"),
                      "rss_file": process_status_bytes("RssFile")}))


def training_start(args: argparse.Namespace) -> None:
    """(A child process) a training stage's start, as ``train.train_stage`` begins: ``build_engine`` (model, the stage
    mix from stores.json, DeepSpeed engine), then the first ``train_step``; the data part timed alone too."""
    started = time.perf_counter()
    from pipeline.config import load_config
    from pipeline.routing_stats import RoutingStats
    from pipeline.run_dir import stage_dir
    from pipeline.train import TrainingRun, build_engine, init_deepspeed_distributed, stage_data, train_step
    from pipeline.training_checkpoint import Layout, ResumePoint

    config = load_config(args.run_config, [f"train.stage1.tokens_per_language={args.tokens}"])
    imported = time.perf_counter() - started
    init_deepspeed_distributed()
    checkpoints = Path(args.work) / f"checkpoints-{args.tokens}"
    run = TrainingRun(config, 0, 1, stage_dir(config, 0, "upcycle") / "model", checkpoints, Layout(1, 1))
    start = time.perf_counter()
    trainer = build_engine(run, ResumePoint(None, True, run.layout))  # a fresh start
    engine_s = time.perf_counter() - start
    outcome = train_step(run, trainer, 0, RoutingStats())
    first_step_s = time.perf_counter() - start
    start = time.perf_counter()
    data = stage_data(run)  # again, alone: stores.json -> the opened stores -> the shuffled mix
    data.micro_batch(0, 0, 1, 0, 1, run.settings.micro_batch_size)
    data_s = time.perf_counter() - start
    print(json.dumps({"blocks": len(trainer.data), "imports_s": imported, "build_engine_s": engine_s,
                      "first_step_s": first_step_s, "data_s": data_s, "loss": outcome.losses["total"],
                      "peak_rss": process_status_bytes("VmHWM")}))


def child(mode: str, work: Path, model: Path, tokens: int, block: int, batch: int, run_config: Path | None = None) -> dict:
    """Run this script in ``mode`` in a fresh process; its JSON line."""
    cmd = [sys.executable, __file__, mode, "--work", str(work), "--model", str(model), "--tokens", str(tokens),
           "--block", str(block), "--batch", str(batch)] + (["--run-config", str(run_config)] if run_config else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MASTER_ADDR": "127.0.0.1"})
    if proc.returncode != 0:
        sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_stores_json(stores: dict, model: Path, path: Path) -> None:
    """What the tokenize stage writes for these stores."""
    from pipeline.store_index import StoreEntry, StoreIndex
    from pipeline.token_store import tokenizer_fingerprint

    StoreIndex(tokenizer_fingerprint(model),
               tuple(StoreEntry.of(lang, split, store) for (lang, split), store in stores.items())).write(path)


def prepare_training_run(work: Path, sources: dict[str, Path], english: Path, model: Path, block: int) -> Path:
    """A run of a tiny random Llama (2 layers, hidden 64) with ``model``'s tokenizer, up to its upcycled model
    (tokenize finds el, hu, tr in the warm cache ``work/cache-2``; en is a small file); its config's path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.token_store import TOKENIZER_FILES

    tiny = work / "tiny-model"
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=block)
                     ).save_pretrained(tiny)
    for name in TOKENIZER_FILES:
        if (model / name).is_file():
            shutil.copyfile(model / name, tiny / name)
    config = work / "train-start.yaml"
    config.write_text(json.dumps({
        "name": "bench", "run_dir": str(work / "run"), "cache_dir": str(work / "cache-2"), "old_languages": ["en"],
        "rounds": [{"name": "g1", "languages": list(LANGUAGES)}], "model": {"path": str(tiny)},
        "data": {"builtin_corpus": "none", "heldout_fraction": HELDOUT_FRACTION,
                 "sources": {lang: {"path": str(p)} for lang, p in {**sources, "en": english}.items()}},
        "analyze": {"tokens_per_language": 2000, "max_length": 128},
        "allocate": {"method": "explicit", "explicit": [3, 3], "classifier_layers": [1]},
        "train": {"stage1": {"block_length": block, "micro_batch_size": TRAIN_MICRO_BATCH, "steps": 1,
                             "warmup_steps": 0}},
        "evaluate": {"block_length": 128},
    }))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--until", "upcycle"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "MASTER_ADDR": "127.0.0.1"})
    if proc.returncode != 0:
        sys.exit(f"preparing the training run failed:\n{proc.stderr[-3000:]}")
    tokenized = [line for line in proc.stderr.splitlines() if " parts joined" in line]
    if any(f"tokenize {lang} " in line for line in tokenized for lang in LANGUAGES):
        sys.exit("the training run's tokenize stage did not find the warm stores in the cache")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "reader", "training-start"])
    parser.add_argument("--tokens-per-language", type=int, default=50_000_000)
    parser.add_argument("--small-tokens", type=int, default=5_000_000)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-total-mb", type=int, default=300, help="size of the generated corpus at least")
    parser.add_argument("--work", help="(child) the benchmark's directory")
    parser.add_argument("--model", help="(child) the tokenizer's model directory")
    parser.add_argument("--tokens", type=int, help="(child) tokens per language")
    parser.add_argument("--run-config", help="(training-start) the prepared run's config")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpus and stores")
    args = parser.parse_args()
    if args.mode == "reader":
        reader(args)
        return
    if args.mode == "training-start":
        training_start(args)
        return

    from pipeline.default_model import ensure_default_model
    from pipeline.libreoffice_corpus import build_libreoffice_corpus
    from pipeline.packing import load_tokenizer
    from pipeline.tokenize_corpus import language_stores

    cache = default_cache_dir()
    model = ensure_default_model(cache)
    corpus = build_libreoffice_corpus(LANGUAGES + ("en",), cache)
    tokenizer = load_tokenizer(model)
    work = Path(tempfile.mkdtemp(prefix="layermoe-data-bench-"))
    budgets = (args.small_tokens, args.tokens_per_language)
    try:
        print(f"generating the corpus in {work} ...", flush=True)
        sources = make_sources({lang: corpus.documents_path(lang) for lang in LANGUAGES}, tokenizer,
                               args.tokens_per_language, args.min_total_mb * 2**20, work)
        source_bytes = sum(p.stat().st_size for p in sources.values())
        print("tokenizing: the in-memory path ...", flush=True)
        memory_s, memory_tokens, memory_digests = in_memory_path(sources, tokenizer)
        load = {"memory": os.getloadavg()[0]}
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
                if store_digest(store) != memory_digests[f"{lang}-{split}"]:
                    sys.exit(f"MISMATCH: the {workers}-worker store of {lang} {split} differs from the in-memory path")
        stores = runs[2][1]
        tokens = sum(s.num_tokens for s in stores.values())
        assert tokens == memory_tokens
        disk = sum(f.stat().st_size for s in stores.values() for f in s.path.rglob("*") if f.is_file())
        train_tokens = {lang: stores[(lang, "train")].num_tokens for lang in LANGUAGES}
        write_stores_json(stores, model, work / "stores.json")
        print("reading: a reader process at each budget ...", flush=True)
        readers = {b: child("reader", work, model, b, args.block, args.batch) for b in budgets}
        print("a training stage's start at each budget ...", flush=True)
        english = work / "en.jsonl"
        english.write_text("".join(corpus.documents_path("en").read_text().splitlines(keepends=True)[:2000]))
        run_config = prepare_training_run(work, sources, english, model, args.block)
        starts = {b: child("training-start", work, model, b, args.block, args.batch, run_config) for b in budgets}
        load["start"] = os.getloadavg()[0]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    mib = 2**20
    print(f"\ncorpus: {source_bytes / mib:,.0f} MiB of jsonl (el, hu, tr), {tokens:,} tokens with the SmolLM2 tokenizer; "
          f"train tokens per language: {', '.join(f'{k} {v:,}' for k, v in train_tokens.items())}; "
          f"{os.cpu_count()} cores")
    print("token streams of both worker counts equal the in-memory path's (sha256 per language and split)\n")
    print(f"{'tokenize':<40}{'seconds':>10}{'tokens/s':>14}{'vs in-memory':>14}{'vs 1 worker':>13}"
          f"{'load avg (1 min) at end':>25}")
    rows = [("in-memory path (encode_document)", memory_s, load["memory"])] + [
        (f"token store, {w} worker(s)", runs[w][0], load[w]) for w in (1, 2)]
    for name, seconds, load_average in rows:
        print(f"{name:<40}{seconds:>10.1f}{tokens / seconds:>14,.0f}{memory_s / seconds:>13.2f}x"
              f"{runs[1][0] / seconds:>12.2f}x{load_average:>25.1f}")
    print(f"\nbytes on disk per token: {disk / tokens:.3f} (token ids {stores[('el', 'train')].meta.dtype}, "
          f"document offsets and separator flags included; {disk / mib:,.0f} MiB for {tokens:,} tokens)\n")
    print(f"{'reader process (stage-1 mix, 3 languages)':<46}{'blocks':>10}{'RSS after imports MiB':>23}"
          f"{'peak RSS MiB':>14}{'file-backed at end':>20}{'stores.json->1st batch s':>26}{'ms/micro-batch':>16}")
    for budget, r in readers.items():
        print(f"{f'{budget:,} tokens per language':<46}{r['blocks']:>10,}{r['rss_after_imports'] / mib:>23.1f}"
              f"{r['peak_rss'] / mib:>14.1f}{r['rss_file'] / mib:>20.1f}{r['first_batch_s']:>26.2f}"
              f"{r['batch_ms']:>16.2f}")
    print(f"\ntraining stage start (tiny upcycled Llama, SmolLM2 tokenizer, micro-batch {TRAIN_MICRO_BATCH} x {args.block}; "
          f"load avg at end {load['start']:.1f})")
    print(f"{'':<46}{'blocks':>10}{'imports s':>11}{'build_engine s':>16}{'start->1st step done s':>24}"
          f"{'data alone s':>14}{'peak RSS MiB':>14}")
    for budget, r in starts.items():
        print(f"{f'{budget:,} tokens per language':<46}{r['blocks']:>10,}{r['imports_s']:>11.2f}"
              f"{r['build_engine_s']:>16.2f}{r['first_step_s']:>24.2f}{r['data_s']:>14.3f}{r['peak_rss'] / mib:>14.1f}")
    small, large = (readers[b] for b in budgets)
    print(f"\npeak RSS difference (reader): {(large['peak_rss'] - small['peak_rss']) / mib:.1f} MiB (goal < 100); "
          f"2 workers vs 1: {runs[1][0] / runs[2][0]:.2f}x (goal >= 1.7); "
          f"training stage start -> first step done at {args.tokens_per_language:,}: "
          f"{starts[args.tokens_per_language]['first_step_s']:.2f} s vs {starts[args.small_tokens]['first_step_s']:.2f} s "
          f"at {args.small_tokens:,} (goal < 5, independent of the corpus size)")


if __name__ == "__main__":
    main()
