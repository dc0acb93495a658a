"""Tokenizing corpora into token stores (``pipeline.token_store``): once per (tokenizer, source, split settings),
in parallel, resumable, split over the ranks of a multi-process launch.

Each language's source is read once, sequentially and streaming. Its documents are routed to their split and cut
into shards of about ``shard_chars`` characters (a function of the corpus alone, so the shards are the same for any
number of workers or ranks). Shard ``i`` belongs to rank ``i % world_size``; that rank's worker processes tokenize
it with batched tokenizer calls and write it atomically as ``part-<i>/`` of the store's work directory. A shard
whose part already exists is not tokenized again, so a killed run resumes where it stopped. When every rank is
done, rank 0 joins the parts into the store (written atomically: same bytes however the work was split or
interrupted) and removes the work directory.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import distributed, log
from pipeline.atomic import atomic_directory, write_json
from pipeline.config import RunConfig
from pipeline.corpus import LanguageSource, Split, iter_split_documents, resolve_source, source_size
from pipeline.errors import LayerMoEError
from pipeline.manifest import hash_path
from pipeline.packing import load_tokenizer, needs_separator
from pipeline.token_store import (META, StoreKey, StoreMeta, TokenStore, concatenate_parts, id_dtype,
                                  tokenizer_fingerprint, write_arrays)

DEFAULT_SHARD_CHARS = 2_000_000  # ~0.5-2M tokens: about a second of one worker's time, the unit of resuming
BATCH_DOCUMENTS = 256  # documents per tokenizer call
SHARDS_IN_FLIGHT_PER_WORKER = 2  # bounds the text held in memory while workers are busy
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class TokenizerSpec:
    """Where a tokenizer is (a model directory or a SentencePiece model file) and how to load it."""

    path: Path
    backend: str = "auto"


@dataclass(frozen=True)
class StoreRequest:
    """The splits of one language's source to have as token stores."""

    source: LanguageSource
    splits: tuple[Split, ...]
    heldout_fraction: float
    split_seed: int
    source_hash: str | None = None  # manifest.hash_path of the source, if the caller has it already (else hashed here)


LOCAL_RANK_COUNT_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")  # torchrun, deepspeed, mpirun


def default_workers() -> int:
    """This process's share of the cores: the cores it may run on, divided by the ranks on this node that the
    launcher names (srun instead binds each task to its own cores: ``--cpus-per-task``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks_here = next((int(os.environ[v]) for v in LOCAL_RANK_COUNT_VARIABLES if os.environ.get(v)), 1)
    return max(1, cores // ranks_here)


def store_key(request: StoreRequest, split: Split, tokenizer: TokenizerSpec, tokenizer_hash: str,
              source_hash: str) -> StoreKey:
    source = request.source
    return StoreKey(language=source.language, split=split, tokenizer=tokenizer_hash,
                    tokenizer_backend=tokenizer.backend, source=source_hash, source_format=source.format,
                    source_field=source.field, text_sample_by=source.text_sample_by,
                    heldout_fraction=request.heldout_fraction, split_seed=request.split_seed)


def part_name(index: int) -> str:
    return f"part-{index:06d}"


def build_stores(requests: list[StoreRequest], tokenizer: TokenizerSpec, root: Path, workers: int | None = None,
                 shard_chars: int = DEFAULT_SHARD_CHARS) -> dict[tuple[str, Split], TokenStore]:
    """The token store of every requested (language, split) under ``root``: opened where it exists (a cache hit),
    tokenized first where not. Under torch.distributed every rank must call this with the same arguments."""
    root = Path(root)
    tokenizer_hash = tokenizer_fingerprint(tokenizer.path)
    keys: dict[tuple[str, Split], StoreKey] = {}
    jobs: list[_LanguageJob] = []
    for request in requests:
        source_hash = request.source_hash or hash_path(request.source.path)
        missing = {}
        for split in request.splits:
            key = store_key(request, split, tokenizer, tokenizer_hash, source_hash)
            keys[(request.source.language, split)] = key
            if not (root / key.dirname).is_dir():
                missing[split] = key
        if missing:
            jobs.append(_LanguageJob(request, missing))
    # the same decision on every rank, even if another job finishes a store meanwhile
    jobs = distributed.broadcast_from_main(jobs)
    if jobs:
        _tokenize(jobs, tokenizer, root, workers or default_workers(), shard_chars)
    tokenized = {(job.request.source.language, split) for job in jobs for split in job.keys}
    stores = {}
    for (language, split), key in keys.items():
        store = TokenStore.open(root / key.dirname, key)
        if (language, split) not in tokenized:
            log.info(f"tokenize {language} {split}: cached, {store.num_documents:,} documents, "
                     f"{store.num_tokens:,} tokens in {store.path}")
        stores[(language, split)] = store
    return stores


# ------------------------------------------------------------------------------------------- main process


@dataclass
class _LanguageJob:
    request: StoreRequest
    keys: dict[Split, StoreKey]  # the splits still to tokenize
    shards: dict[Split, int] = field(default_factory=dict)  # shards per split, once the source has been read


@dataclass(frozen=True)
class _Shard:
    part_dir: Path
    texts: list[str]
    dtype: str


class _Progress:
    """Counts and a log line at most every ``PROGRESS_EVERY_S``: documents, tokens, tokens/s, ETA."""

    def __init__(self, total_bytes: int, workers: int):
        self.total_bytes = total_bytes
        self.workers = workers
        self.started = self.last = time.perf_counter()
        self.read_at_start = _bytes_read()
        self.documents = self.tokens = self.parts = 0

    def report(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        line = (f"tokenize: {self.documents:,} documents read, {self.parts} parts tokenized, {self.tokens:,} tokens "
                f"({self.tokens / elapsed:,.0f} tokens/s, {self.workers} workers")
        rank = distributed.current()
        if rank.world_size > 1:
            line += f", rank 0 of {rank.world_size}"
        read = _bytes_read()
        if read is not None and self.read_at_start is not None and self.total_bytes > 0:
            fraction = min(1.0, (read - self.read_at_start) / self.total_bytes)
            if fraction > 0:
                line += f"; {fraction:.0%} of the source read, ETA {elapsed * (1 - fraction) / fraction:.0f}s"
        log.info(line + ")")


def _bytes_read() -> int | None:
    """Bytes this process has read through system calls so far (Linux), for the ETA; None where unknown."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class _ShardCutter:
    """Cuts one split's documents into shards of about ``shard_chars`` characters and submits this rank's
    unfinished ones; the texts of other shards are only counted."""

    def __init__(self, work_dir: Path, shard_chars: int, dtype: str, submit):
        self.work_dir, self.shard_chars, self.dtype, self.submit = work_dir, shard_chars, dtype, submit
        self.rank = distributed.current()
        self.index = self.chars = self.finished_before = 0
        self.texts: list[str] = []
        self.keep = self._keeps(0)

    def _keeps(self, index: int) -> bool:
        if index % self.rank.world_size != self.rank.rank:
            return False
        if (self.work_dir / part_name(index)).is_dir():
            self.finished_before += 1
            return False
        return True

    def add(self, text: str) -> None:
        if self.keep:
            self.texts.append(text)
        self.chars += len(text)
        if self.chars >= self.shard_chars:
            self._close()

    def _close(self) -> None:
        if self.keep:
            self.submit(_Shard(self.work_dir / part_name(self.index), self.texts, self.dtype))
        self.index += 1
        self.texts, self.chars = [], 0
        self.keep = self._keeps(self.index)

    def finish(self) -> int:
        """Close the last shard; the number of shards."""
        if self.chars:
            self._close()
        return self.index


def _tokenize(jobs: list[_LanguageJob], spec: TokenizerSpec, root: Path, workers: int, shard_chars: int) -> None:
    """Tokenize this rank's shards of every job, then (rank 0) join each store's parts. A clear error on any rank
    is raised on every rank, so none waits for the others forever."""
    vocab_size = len(load_tokenizer(spec.path, spec.backend))
    dtype = id_dtype(vocab_size).name
    failure = None
    try:
        _tokenize_shards(jobs, spec, root, workers, shard_chars, dtype)
    except LayerMoEError as e:
        failure = str(e)
    _raise_if_any_rank_failed(failure)
    if distributed.current().is_main:
        try:
            for job in jobs:
                for split, key in job.keys.items():
                    if job.shards[split]:
                        _finalize(root, key, _work_dir(root, key, shard_chars), job.shards[split], dtype, vocab_size,
                                  job.request.source.path)
        except LayerMoEError as e:
            failure = str(e)
    _raise_if_any_rank_failed(failure)
    for job in jobs:  # every rank read every document: all raise alike
        for split in job.keys:
            if job.shards[split] == 0:
                raise LayerMoEError(f"language {job.request.source.language!r}: corpus {str(job.request.source.path)!r} "
                                    f"has no {split} documents (heldout_fraction {job.request.heldout_fraction})")


def _raise_if_any_rank_failed(failure: str | None) -> None:
    """A barrier that also raises, on every rank, the first rank's error message (if any rank had one)."""
    failures = distributed.all_gather_objects(failure)
    for rank, message in enumerate(failures):
        if message is not None:
            raise LayerMoEError(message if len(failures) == 1 else f"rank {rank}: {message}")


def _tokenize_shards(jobs: list[_LanguageJob], spec: TokenizerSpec, root: Path, workers: int, shard_chars: int,
                     dtype: str) -> None:
    """Read each job's source once and have the worker pool tokenize this rank's unfinished shards into parts."""
    progress = _Progress(sum(source_size(job.request.source) for job in jobs), workers)
    pool = ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_init_worker, initargs=(spec,))
    in_flight: set[Future] = set()

    def collect(at_most: int) -> None:
        """Wait until at most ``at_most`` shards are in flight, counting the finished ones."""
        while len(in_flight) > at_most:
            done, _ = wait(in_flight, timeout=PROGRESS_EVERY_S, return_when=FIRST_COMPLETED)
            for future in done:
                in_flight.discard(future)
                progress.tokens += future.result()
                progress.parts += 1
            progress.report()

    def submit(shard: _Shard) -> None:
        collect(workers * SHARDS_IN_FLIGHT_PER_WORKER - 1)
        in_flight.add(pool.submit(_tokenize_shard, shard))

    try:
        for job in jobs:
            source = job.request.source
            cutters = {split: _ShardCutter(_work_dir(root, key, shard_chars), shard_chars, dtype, submit)
                       for split, key in job.keys.items()}
            log.info(f"tokenize {source.language} ({', '.join(job.keys)}): {source.path} with {workers} workers")
            for split, text in iter_split_documents(source, job.request.heldout_fraction, job.request.split_seed):
                cutter = cutters.get(split)
                if cutter is not None:
                    cutter.add(text)
                progress.documents += 1
                progress.report()
            for split, cutter in cutters.items():
                job.shards[split] = cutter.finish()
                if cutter.finished_before:
                    log.info(f"tokenize {source.language} {split}: resumed, {cutter.finished_before} of this rank's "
                             f"parts were already done")
        collect(0)
    except BrokenProcessPool:
        raise LayerMoEError("tokenize: a worker process died (out of memory? see the messages above)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    progress.report(force=True)


def _work_dir(root: Path, key: StoreKey, shard_chars: int) -> Path:
    """Where a store's parts collect until it is finished (kept across a killed run: the resume point)."""
    return root / f".{key.dirname}.parts-{shard_chars}"


def _finalize(root: Path, key: StoreKey, work_dir: Path, shards: int, dtype: str, vocab_size: int,
              source_path: Path) -> None:
    """Join the parts into the store (checked, written atomically) and remove the work directory."""
    final = root / key.dirname
    if final.is_dir():  # another job with the same inputs finished first
        return
    parts = [work_dir / part_name(index) for index in range(shards)]
    missing = [str(p) for p in parts if not p.is_dir()]
    if missing:
        raise LayerMoEError(f"tokenize: {len(missing)} parts are missing after every rank finished, e.g. {missing[0]} "
                            f"(every rank must see the same cache directory)")
    started = time.perf_counter()
    log.info(f"tokenize {key.language} {key.split}: joining {shards} parts")
    with atomic_directory(final) as tmp:
        documents, tokens = concatenate_parts(parts, tmp, np.dtype(dtype))
        meta = StoreMeta(key, documents, tokens, dtype, vocab_size, str(source_path),
                         time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_json(tmp / META, meta.to_json())
        TokenStore.open(tmp, key)
    shutil.rmtree(work_dir)
    size = sum(f.stat().st_size for f in final.glob("*.npy"))
    log.info(f"tokenize {key.language} {key.split}: {documents:,} documents, {tokens:,} tokens, "
             f"{size / max(tokens, 1):.2f} bytes/token on disk, {shards} parts joined in "
             f"{time.perf_counter() - started:.1f}s -> {final}")


# ------------------------------------------------------------------------------------------- worker processes

_worker_tokenizer = None


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers are forked from a server that imported this module and the tokenizer libraries once: no threads or
    CUDA state of the caller are forked, and a worker starts without re-importing them. As with any spawn or fork
    server pool, a calling script must guard its entry point (``if __name__ == "__main__"``), as the stage scripts
    and the CLI do."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "transformers.models.auto.tokenization_auto", "tokenizers"])
    return context


def _init_worker(spec: TokenizerSpec) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec.path, spec.backend)


def _tokenize_shard(shard: _Shard) -> int:
    """Tokenize one shard (each text by the rule ``token_store.ENCODING``, in batched tokenizer calls), write it as a
    part; its token count."""
    tokenizer = _worker_tokenizer
    eos = tokenizer.eos_token_id
    dtype = np.dtype(shard.dtype)
    pieces, lengths, separator = [], [], []
    for start in range(0, len(shard.texts), BATCH_DOCUMENTS):
        flat: list[int] = []
        for ids in tokenizer(shard.texts[start:start + BATCH_DOCUMENTS], add_special_tokens=True)["input_ids"]:
            appended = needs_separator(ids, eos)
            flat += ids
            if appended:
                flat.append(eos)
            lengths.append(len(ids) + appended)
            separator.append(appended)
        batch = np.array(flat, dtype=np.int64)
        if len(batch) and (batch.min() < 0 or batch.max() > np.iinfo(dtype).max):
            raise LayerMoEError(f"tokenize: token id {int(batch.max())} does not fit {dtype} (vocab size too small?)")
        pieces.append(batch.astype(dtype))
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    with atomic_directory(shard.part_dir) as tmp:
        write_arrays(tmp, ids, np.array(lengths, dtype=np.int64), np.array(separator, dtype=np.bool_))
    return len(ids)


# ------------------------------------------------------------------------------------------- from a run config


def tokens_root(config: RunConfig) -> Path:
    """Where a run's token stores live: shared by every run with the same cache directory."""
    return config.cache_path / "tokens"


def language_stores(config: RunConfig, splits: dict[str, tuple[Split, ...]], tokenizer_path: Path,
                    source_hashes: dict[str, str] | None = None) -> dict[tuple[str, Split], TokenStore]:
    """The token stores of the given languages' splits for a model's tokenizer, tokenizing any that are missing.
    ``source_hashes``: ``manifest.hash_path`` of languages' sources that the caller has computed already."""
    hashes = source_hashes or {}
    requests = [StoreRequest(resolve_source(config, language), tuple(language_splits), config.data.heldout_fraction,
                             config.data.split_seed, hashes.get(language))
                for language, language_splits in splits.items()]
    return build_stores(requests, TokenizerSpec(Path(tokenizer_path)), tokens_root(config),
                        config.data.tokenize_workers)
