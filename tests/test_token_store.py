"""Token stores: the same blocks, documents and samples as today's tokenize-on-the-fly paths; cache hits; resume
after a real SIGKILL; two gloo ranks; every corrupt or mismatched store is one clear error."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import synthetic_documents, write_jsonl
from pipeline.config import (ConfigError, DataConfig, EvaluateConfig, RoundConfig, RunConfig, SourceConfig,
                             StageTrainConfig, TrainConfig, validate)
from pipeline.corpus import LanguageSource, is_heldout
from pipeline.errors import LayerMoEError
from pipeline.packing import load_tokenizer
from pipeline.ranks import free_port
from pipeline.store_index import StoreEntry, StoreIndex
from pipeline.token_blocks import BlockView, sample_chunks
from pipeline.token_store import TokenStore, id_dtype, tokenizer_fingerprint
from pipeline.tokenize_corpus import (StoreRequest, TokenizerSpec, _ShardCutter, build_stores, default_workers,
                                      language_stores, store_key)
from pipeline.training_data import StageMix, build_stage_mix, micro_batch_indices, stage_languages
from reference_data import build_stage_data, encode_document, heldout_blocks, iter_packed, split_documents, token_chunks

ROOT = Path(__file__).resolve().parents[1]
LANGS = ("en", "el", "hu")
ENDS_WITH_EOS = "Αβγ δεζ ηθι </s>"  # the tokenizer itself ends this one with EOS: no separator is appended


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("token_corpus")
    files = {lang: write_jsonl(root / f"{lang}.jsonl", synthetic_documents(lang, 150, seed=5)) for lang in LANGS}
    el = synthetic_documents("el", 150, seed=5)
    write_jsonl(files["el"], el[:70] + [ENDS_WITH_EOS] + el[70:])
    return files


def _config(corpus: dict[str, Path], cache: Path, stage1_tokens: int = 600) -> RunConfig:
    return RunConfig(
        name="t", old_languages=["en"], rounds=[RoundConfig("g1", ["el", "hu"])], cache_dir=str(cache), seed=3,
        data=DataConfig(builtin_corpus="none", sources={lang: SourceConfig(str(p)) for lang, p in corpus.items()},
                        heldout_fraction=0.2, split_seed=1, tokenize_workers=2),
        train=TrainConfig(stage1=StageTrainConfig(block_length=16, micro_batch_size=3, gradient_accumulation=2,
                                                  tokens_per_language=stage1_tokens),
                          stage2=StageTrainConfig(block_length=16, micro_batch_size=3, tokens_per_language=400,
                                                  replay_tokens_per_language=300)),
        evaluate=EvaluateConfig(tokens_per_language=200, block_length=16))


def _request(path: Path, language: str = "el", splits=("train", "heldout"), fraction: float = 0.2) -> StoreRequest:
    return StoreRequest(LanguageSource(language, path, "jsonl"), tuple(splits), fraction, 1)


def _parts_joined(log: str) -> dict[str, int]:
    """Split -> number of parts the store was joined from, from tokenize's log."""
    return {m[0]: int(m[1]) for m in re.findall(r"tokenize \w+ (\w+): .* (\d+) parts joined", log)}


def _store_files(store_dir: Path) -> dict[str, bytes]:
    """Every file of a store by relative path; meta.json without its creation time."""
    files = {}
    for f in sorted(store_dir.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            if f.name == "meta.json":
                meta = json.loads(data)
                meta.pop("created_at")
                data = json.dumps(meta, sort_keys=True).encode()
            files[str(f.relative_to(store_dir))] = data
    return files


# ------------------------------------------------------------------------------- same tokens as today's paths


@pytest.mark.parametrize("backend", ["auto", "sentencepiece"])
def test_store_holds_todays_documents_and_blocks(tmp_path, corpus, tokenizer_dir, backend, capsys):
    request = _request(corpus["el"])
    stores = build_stores([request], TokenizerSpec(tokenizer_dir, backend), tmp_path, workers=2, shard_chars=1500)
    tokenizer = load_tokenizer(tokenizer_dir, backend)
    err = capsys.readouterr().err
    assert _parts_joined(err)["train"] > 4  # parts written out of order by 2 workers, joined
    assert re.search(r"tokenize: \d+ documents read, \d+ parts tokenized, [\d,]+ tokens \([\d,]+ tokens/s, 2 workers; "
                     r"\d+% of the source read, ETA \d+s\)", err)  # the progress line
    for split in ("train", "heldout"):
        store = stores[("el", split)]
        docs = list(split_documents(request.source, split, 0.2, 1))
        assert store.num_documents == len(docs)
        for i, text in enumerate(docs):
            assert store.document(i).tolist() == encode_document(tokenizer, text)
            assert store.text_ids(i).tolist() == list(tokenizer(text, add_special_tokens=True)["input_ids"])
        stream = [t for text in docs for t in encode_document(tokenizer, text)]
        assert store.num_tokens == len(stream)
        assert store.tokens(5, len(stream) - 3).tolist() == stream[5:-3]
        for block_length in (16, 61):
            expected = [ids for ids, _ in iter_packed(((0, t) for t in docs), tokenizer, block_length)]
            view = BlockView(store, block_length)
            assert view.num_blocks == len(expected)
            assert view.blocks(range(view.num_blocks)).tolist() == expected
            assert view.leading(3).tolist() == expected[:3]
    split = "heldout" if is_heldout(ENDS_WITH_EOS, 0.2, 1) else "train"
    i = list(split_documents(request.source, split, 0.2, 1)).index(ENDS_WITH_EOS)
    ends_with_eos = tokenizer(ENDS_WITH_EOS, add_special_tokens=True)["input_ids"][-1] == tokenizer.eos_token_id
    store = stores[("el", split)]
    assert (len(store.text_ids(i)) == len(store.document(i))) == ends_with_eos
    if backend == "auto":
        assert ends_with_eos  # the document without an appended separator is exercised


@pytest.mark.parametrize("stage1_tokens", [600, 40_000])  # within the text; more than the text (repeated)
def test_stage_mix_equals_the_in_memory_stage_blocks(tmp_path, corpus, tokenizer_dir, stage1_tokens):
    config = _config(corpus, tmp_path, stage1_tokens)
    tokenizer = load_tokenizer(tokenizer_dir)
    for stage in (1, 2):
        languages, _ = stage_languages(config, 0, stage)
        stores = language_stores(config, {lang: ("train",) for lang in languages}, tokenizer_dir)
        mix = build_stage_mix(config, 0, stage, {lang: stores[(lang, "train")] for lang in languages})
        reference = build_stage_data(config, 0, stage, tokenizer)
        assert len(mix) == len(reference.blocks)
        settings = config.train.stage1 if stage == 1 else config.train.stage2
        acc, batch = settings.gradient_accumulation, settings.micro_batch_size
        steps = min(len(mix) // (acc * 2 * batch) + 2, 40)  # wraps around the blocks (the smaller budget)
        for world in (1, 2):
            for step in range(steps):
                for micro in range(acc):
                    for rank in range(world):
                        got = mix.micro_batch(step, micro, acc, rank, world, batch)
                        index = micro_batch_indices(len(reference.blocks), step, micro, acc, rank, world, batch)
                        assert torch.equal(got.index, index)
                        assert torch.equal(got.input_ids, reference.blocks.input_ids[index])
                        assert torch.equal(got.language_ids, reference.blocks.language_ids[index])
                        assert torch.equal(mix.original_mask(got.language_ids),
                                           reference.original_mask(reference.blocks.language_ids[index]))


def test_a_budget_above_the_text_repeats_the_language(tmp_path, corpus, tokenizer_dir, capsys):
    config = _config(corpus, tmp_path, stage1_tokens=40_000)
    stores = language_stores(config, {"el": ("train",), "hu": ("train",)}, tokenizer_dir)
    mix = build_stage_mix(config, 0, 1, {lang: stores[(lang, "train")] for lang in ("el", "hu")})
    assert mix.counts == [40_000 // 16] * 2
    assert "repeating them" in capsys.readouterr().err
    language, block = mix.locate(torch.arange(len(mix)))
    for i, view in enumerate(mix.views):
        assert view.num_blocks < mix.counts[i]
        uses = np.bincount(block[language == i], minlength=view.num_blocks)
        assert uses.min() == mix.counts[i] // view.num_blocks and uses.max() <= -(-mix.counts[i] // view.num_blocks)


@pytest.mark.parametrize("include_special", [False, True])
def test_analyze_sample_equals_token_chunks(tmp_path, corpus, tokenizer_dir, include_special):
    tokenizer = load_tokenizer(tokenizer_dir)
    request = _request(corpus["el"], splits=("train",))
    store = build_stores([request], TokenizerSpec(tokenizer_dir), tmp_path, workers=1, shard_chars=1500)[("el", "train")]
    for tokens in (1, 37, 800, 10**7):
        expected, count = token_chunks(split_documents(request.source, "train", 0.2, 1), tokenizer, tokens, 24,
                                       include_special)
        got, got_count = sample_chunks(store, tokens, 24, include_special, tokenizer.all_special_ids)
        assert got_count == count
        assert [c.input_ids.tolist() for c in got] == [c.input_ids for c in expected]
        assert [c.counted.tolist() for c in got] == [c.counted for c in expected]


def _index(stores: dict, tokenizer_dir: Path) -> StoreIndex:
    """What the tokenize stage writes to stores.json for these stores."""
    return StoreIndex(tokenizer_fingerprint(tokenizer_dir),
                      tuple(StoreEntry.of(lang, split, store) for (lang, split), store in stores.items()))


def test_evaluate_reads_the_in_memory_heldout_blocks(tmp_path, corpus, tokenizer_dir):
    from pipeline.evaluate import heldout_blocks as evaluate_heldout_blocks

    tokenizer = load_tokenizer(tokenizer_dir)
    for tokens in (200, 10**6):  # fewer blocks than the held-out text has, and more
        config = _config(corpus, tmp_path)
        config.evaluate.tokens_per_language = tokens
        expected = heldout_blocks(config, list(LANGS), tokenizer)
        index = _index(language_stores(config, {lang: ("heldout",) for lang in LANGS}, tokenizer_dir), tokenizer_dir)
        got = evaluate_heldout_blocks(config, list(LANGS), index)
        assert got.keys() == expected.keys()
        for lang in LANGS:
            assert torch.equal(got[lang], expected[lang])


# ------------------------------------------------------------------------------- cache, resume, ranks


def test_second_open_and_later_round_tokenize_nothing(tmp_path, corpus, tokenizer_dir, capsys):
    from pipeline.export import TOKENIZER_FILES

    request = _request(corpus["hu"], "hu")
    first = build_stores([request], TokenizerSpec(tokenizer_dir), tmp_path / "tokens", workers=1, shard_chars=1500)
    parts = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for s in first.values() for p in s.path.rglob("*.npy")}
    capsys.readouterr()
    expanded = tmp_path / "round2_model"  # what save_expanded copies from the round's input model
    expanded.mkdir()
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, expanded / name)
    (expanded / "config.json").write_text("{}")
    assert tokenizer_fingerprint(expanded) == tokenizer_fingerprint(tokenizer_dir)
    for spec in (TokenizerSpec(tokenizer_dir), TokenizerSpec(expanded)):
        again = build_stores([request], spec, tmp_path / "tokens", workers=1, shard_chars=1500)
        assert {k: s.path for k, s in again.items()} == {k: s.path for k, s in first.items()}
    err = capsys.readouterr().err
    assert err.count("cached") == 4 and "workers" not in err
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts} == parts
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == sorted(s.path.name for s in first.values())


KILLABLE = """
import sys
from pathlib import Path
from pipeline.corpus import LanguageSource
from pipeline.tokenize_corpus import StoreRequest, TokenizerSpec, build_stores
source = LanguageSource("el", Path(sys.argv[1]), "jsonl")
build_stores([StoreRequest(source, ("train",), 0.2, 1)], TokenizerSpec(Path(sys.argv[2])), Path(sys.argv[3]),
             workers=1, shard_chars=int(sys.argv[4]))
"""


def test_resume_after_sigkill_gives_identical_files(tmp_path, tokenizer_dir, capsys):
    source = write_jsonl(tmp_path / "el.jsonl", synthetic_documents("el", 6000, seed=11))
    shard_chars = 2500
    args = [str(source), str(tokenizer_dir), str(tmp_path / "killed")]
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, *args, str(shard_chars)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    parts: list[Path] = []
    while len(parts) < 3 and proc.poll() is None and time.monotonic() < deadline:
        parts = list((tmp_path / "killed").glob(f".el-train-*.parts-{shard_chars}/part-*"))
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, the fork server and the workers: a job killed by Slurm
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert not list((tmp_path / "killed").glob("el-train-*"))  # no store yet
    done = len(list((tmp_path / "killed").glob(f".el-train-*.parts-{shard_chars}/part-*")))
    capsys.readouterr()
    request = _request(source, splits=("train",))
    resumed = build_stores([request], TokenizerSpec(tokenizer_dir), tmp_path / "killed", workers=1,
                           shard_chars=shard_chars)[("el", "train")]
    err = capsys.readouterr().err
    total = _parts_joined(err)["train"]
    assert 3 <= done < total  # killed mid-way
    assert f"resumed, {done} of this rank's parts were already done" in err
    assert f" {total - done} parts tokenized" in err  # only the rest
    assert [p.name for p in (tmp_path / "killed").iterdir()] == [resumed.path.name]  # work directory removed
    clean = build_stores([request], TokenizerSpec(tokenizer_dir), tmp_path / "clean", workers=2,
                         shard_chars=shard_chars)[("el", "train")]
    assert resumed.path.name == clean.path.name
    assert _store_files(resumed.path) == _store_files(clean.path)


def _rank_worker(rank: int, port: int, corpus: dict, tokenizer_dir: str, root: str, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        requests = [_request(Path(corpus[lang]), lang) for lang in ("el", "hu")]
        stores = build_stores(requests, TokenizerSpec(Path(tokenizer_dir)), Path(root), workers=1, shard_chars=1500)
        mix = _mix(stores)
        batches = [mix.micro_batch(step, micro, 2, rank, 2, 3) for step in range(4) for micro in range(2)]
        mine: list[int] = []  # the shards this rank tokenizes: every document its own shard here
        cutter = _ShardCutter(Path(root) / "unused", 1, "uint16", lambda shard: mine.append(int(shard.part_dir.name[5:])))
        for text in synthetic_documents("el", 9):
            cutter.add(text)
        try:  # a cache that is not shared by the ranks (node-local disks): rank 0 cannot see rank 1's parts
            build_stores([_request(Path(corpus["hu"]), "hu", ("train",))], TokenizerSpec(Path(tokenizer_dir)),
                         Path(root) / f"node-local-{rank}", workers=1, shard_chars=1500)
            error = None
        except LayerMoEError as e:
            error = str(e)
        out[rank] = ({f"{k[0]}-{k[1]}": str(s.path) for k, s in stores.items()},
                     [(b.index.numpy(), b.input_ids.numpy(), b.language_ids.numpy()) for b in batches],
                     (mine, cutter.finish()), error)
    finally:
        dist.destroy_process_group()


def _mix(stores) -> StageMix:
    views = [BlockView(stores[(lang, "train")], 16) for lang in ("el", "hu")]
    return StageMix(["el", "hu"], views, [50, 40], 7, torch.tensor([False, True]))


def test_two_ranks_split_the_work_and_read_disjoint_batches(tmp_path, corpus, tokenizer_dir):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_worker, args=(free_port(), {k: str(v) for k, v in corpus.items()}, str(tokenizer_dir),
                                     str(tmp_path / "two"), out), nprocs=2, join=True)
        results = dict(out)
    requests = [_request(corpus[lang], lang) for lang in ("el", "hu")]
    single = build_stores(requests, TokenizerSpec(tokenizer_dir), tmp_path / "one", workers=1, shard_chars=1500)
    assert results[0][0] == results[1][0]
    assert results[0][2] == ([0, 2, 4, 6, 8], 9) and results[1][2] == ([1, 3, 5, 7], 9)  # shard i on rank i % 2
    assert results[0][3] == results[1][3]  # one rank's error is raised on every rank (none waits forever)
    assert re.fullmatch(r"rank 0: tokenize: \d+ parts are missing after every rank finished, e\.g\. \S+part-\d+ "
                        r"\(every rank must see the same cache directory\)", results[0][3])
    for (lang, split), store in single.items():
        two_rank_dir = Path(results[0][0][f"{lang}-{split}"])
        assert two_rank_dir.name == store.path.name
        assert _store_files(two_rank_dir) == _store_files(store.path)
    mix = _mix(single)
    for i, (step, micro) in enumerate((s, m) for s in range(4) for m in range(2)):
        whole = mix.micro_batch(step, micro, 2, 0, 1, 6)
        halves = [results[rank][1][i] for rank in (0, 1)]
        assert not set(halves[0][0].tolist()) & set(halves[1][0].tolist())
        for field, expected in enumerate((whole.index, whole.input_ids, whole.language_ids)):
            assert np.array_equal(np.concatenate([h[field] for h in halves]), expected.numpy())


# ------------------------------------------------------------------------------- errors


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_empty_source_and_empty_split_are_errors(tmp_path, tokenizer_dir):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["  ", ""])
    with pytest.raises(LayerMoEError, match="no non-empty documents") as e:
        build_stores([_request(empty)], TokenizerSpec(tokenizer_dir), tmp_path / "tokens", workers=1)
    _one_line(e)
    few = write_jsonl(tmp_path / "few.jsonl", synthetic_documents("el", 20))
    with pytest.raises(LayerMoEError, match=r"few\.jsonl' has no heldout documents") as e:
        build_stores([_request(few, fraction=1e-9)], TokenizerSpec(tokenizer_dir), tmp_path / "tokens", workers=1)
    _one_line(e)
    assert [p.name.split("-")[1] for p in (tmp_path / "tokens").iterdir()] == ["train"]  # nothing half-written


def _damage(store: TokenStore, name: str, how) -> Path:
    path = store.path / name
    how(path)
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda p: os.truncate(p, p.stat().st_size - 6), r"ids\.npy is truncated: "),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0\0"), r"ids\.npy is corrupt: "),
    (lambda p: p.write_bytes(b"garbage!" + p.read_bytes()[8:]), r"ids\.npy is corrupt \(unreadable header"),
    (lambda p: os.unlink(p), r"ids\.npy is missing"),
    (lambda p: (p.parent / "offsets.npy").write_bytes((p.parent / "offsets.npy").read_bytes()[:-8]
                                                     + np.int64(10**9).tobytes()), "document offsets run from 0 to"),
    (lambda p: (p.parent / "meta.json").write_text("{"), r"meta\.json is not valid JSON"),
])
def test_damaged_store_is_one_clear_error(tmp_path, corpus, tokenizer_dir, damage, message):
    request = _request(corpus["el"], splits=("train",))
    store = build_stores([request], TokenizerSpec(tokenizer_dir), tmp_path, workers=1, shard_chars=1500)[("el", "train")]
    _damage(store, "ids.npy", damage)
    with pytest.raises(LayerMoEError, match=message) as e:
        TokenStore.open(store.path)
    _one_line(e)
    with pytest.raises(LayerMoEError, match=message):  # the cache-hit path checks the same
        build_stores([request], TokenizerSpec(tokenizer_dir), tmp_path, workers=1, shard_chars=1500)


def test_store_of_another_tokenizer_is_refused(tmp_path, corpus, tokenizer_dir):
    request = _request(corpus["el"], splits=("train",))
    store = build_stores([request], TokenizerSpec(tokenizer_dir), tmp_path, workers=1, shard_chars=1500)[("el", "train")]
    other = tmp_path / "other_tokenizer"
    shutil.copytree(tokenizer_dir, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    key = store_key(request, "train", TokenizerSpec(other), tokenizer_fingerprint(other), store.meta.key.source)
    with pytest.raises(LayerMoEError, match="was made with another tokenizer") as e:
        TokenStore.open(store.path, expected=key)
    _one_line(e)
    with pytest.raises(LayerMoEError, match="was made with another tokenizer"):
        TokenStore.open(store.path, tokenizer=other)
    assert TokenStore.open(store.path, tokenizer=tokenizer_dir).num_tokens == store.num_tokens
    with pytest.raises(LayerMoEError, match=r"does not exist"):
        TokenStore.open(tmp_path / "nothing")


def test_id_dtype_and_workers_setting(monkeypatch):
    assert id_dtype(49_152) == np.uint16 and id_dtype(65_535) == np.uint16
    assert id_dtype(65_536) == np.uint32 and id_dtype(151_936) == np.uint32
    cores = len(os.sched_getaffinity(0))
    for variable in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):  # torchrun, deepspeed: the node's cores are shared
        monkeypatch.setenv(variable, "2")
        assert default_workers() == max(1, cores // 2)
        monkeypatch.setenv(variable, str(4 * cores))
        assert default_workers() == 1
        monkeypatch.delenv(variable)
    assert default_workers() == cores
    config = RunConfig(name="t", old_languages=["en"], rounds=[RoundConfig("g1", ["el"])],
                       data=DataConfig(tokenize_workers=0))
    with pytest.raises(ConfigError, match="data.tokenize_workers"):
        validate(config)
