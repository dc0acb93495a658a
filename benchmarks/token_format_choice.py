"""Why token stores are numpy arrays: the same ~20 MB of text tokenized into a token store (2 workers) and
with HF ``datasets`` (``load_dataset("json")`` + ``.map(batched=True, num_proc=2)``, ids as uint16 Arrow lists):
tokens/s, bytes on disk per token, and the time to read one random 1024-token block.

    python benchmarks/token_format_choice.py
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.config import default_cache_dir
from pipeline.corpus import LanguageSource
from pipeline.packing import load_tokenizer, needs_separator

LANGUAGES = ("el", "hu", "tr", "en")
BLOCK = 1024
READS = 2000


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def hf_tokenize(batch: dict, model: str) -> dict:
    global _tokenizer
    if "_tokenizer" not in globals():
        _tokenizer = load_tokenizer(model)
    out = []
    for ids in _tokenizer(batch["text"], add_special_tokens=True)["input_ids"]:
        out.append(ids + [_tokenizer.eos_token_id] if needs_separator(ids, _tokenizer.eos_token_id) else ids)
    return {"input_ids": out}


def main() -> None:
    import datasets
    import pyarrow.compute as pc

    from pipeline.default_model import ensure_default_model
    from pipeline.libreoffice_corpus import build_libreoffice_corpus
    from pipeline.token_blocks import BlockView
    from pipeline.tokenize_corpus import StoreRequest, TokenizerSpec, build_stores

    datasets.disable_progress_bars()
    cache = default_cache_dir()
    model = ensure_default_model(cache)
    corpus = build_libreoffice_corpus(LANGUAGES, cache)
    work = Path(tempfile.mkdtemp(prefix="layermoe-format-bench-"))
    try:
        source = work / "mixed.jsonl"
        source.write_text("".join(corpus.documents_path(lang).read_text() for lang in LANGUAGES))
        source_mib = source.stat().st_size / 2**20
        spec = TokenizerSpec(model)
        warm = work / "warm.jsonl"  # start the fork server outside the timing
        warm.write_text("".join(source.read_text().splitlines(keepends=True)[:200]))
        build_stores([StoreRequest(LanguageSource("xx", warm, "jsonl"), ("train",), 0.5, 0)], spec, work / "warm",
                     workers=2)

        start = time.perf_counter()
        stores = build_stores([StoreRequest(LanguageSource("xx", source, "jsonl"), ("train", "heldout"), 0.05, 0)],
                              spec, work / "npy", workers=2)
        npy_s = time.perf_counter() - start
        npy_tokens = sum(s.num_tokens for s in stores.values())
        npy_bytes = sum(directory_bytes(s.path) for s in stores.values())

        start = time.perf_counter()
        raw = datasets.load_dataset("json", data_files=[str(source)], split="train", cache_dir=str(work / "hf-raw"))
        raw = raw.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
        load_s = time.perf_counter() - start
        raw_copy_mib = directory_bytes(work / "hf-raw") / 2**20
        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint16"))})
        start = time.perf_counter()
        tokenized = raw.map(hf_tokenize, batched=True, batch_size=256, num_proc=2, fn_kwargs={"model": str(model)},
                            remove_columns=raw.column_names, features=features,
                            cache_file_name=str(work / "hf-tok" / "tokens.arrow"))
        map_s = time.perf_counter() - start
        hf_bytes = directory_bytes(work / "hf-tok")
        lengths = pc.list_value_length(tokenized.data.column("input_ids")).to_numpy()
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        hf_tokens = int(offsets[-1])

        view = BlockView(stores[("xx", "train")], BLOCK)
        rng = np.random.default_rng(0)
        picks = rng.integers(0, view.num_blocks, READS)
        start = time.perf_counter()
        for j in picks:
            view.blocks([j])
        npy_read = (time.perf_counter() - start) / READS
        hf_blocks = hf_tokens // BLOCK
        picks = rng.integers(0, hf_blocks, READS)
        start = time.perf_counter()
        for j in picks:  # the rows that hold tokens [j * BLOCK, (j + 1) * BLOCK), through the datasets API
            first = int(np.searchsorted(offsets, j * BLOCK, side="right")) - 1
            last = int(np.searchsorted(offsets, (j + 1) * BLOCK, side="left"))
            rows = tokenized[first:last]["input_ids"]
            flat = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
            skip = j * BLOCK - int(offsets[first])
            flat[skip:skip + BLOCK]
        hf_read = (time.perf_counter() - start) / READS
        values = tokenized.data.column("input_ids").combine_chunks().values.to_numpy(zero_copy_only=True)
        start = time.perf_counter()
        for j in picks:  # the same, straight from the memory-mapped Arrow buffer
            values[j * BLOCK:(j + 1) * BLOCK].astype(np.int64)
        arrow_read = (time.perf_counter() - start) / READS
    finally:
        shutil.rmtree(work, ignore_errors=True)

    assert hf_tokens == npy_tokens, (hf_tokens, npy_tokens)
    print(f"\n{source_mib:.1f} MiB of jsonl ({', '.join(LANGUAGES)}), {npy_tokens:,} tokens, "
          f"SmolLM2 tokenizer, 2 worker processes each\n")
    print(f"{'':<44}{'tokens/s':>12}{'bytes/token':>13}{'random block read':>19}")
    print(f"{'token store (npy, pread)':<44}{npy_tokens / npy_s:>12,.0f}{npy_bytes / npy_tokens:>13.3f}"
          f"{npy_read * 1e6:>16.1f} us")
    print(f"{'datasets .map(num_proc=2), rows via datasets':<44}{hf_tokens / map_s:>12,.0f}"
          f"{hf_bytes / hf_tokens:>13.3f}{hf_read * 1e6:>16.1f} us")
    print(f"{'  same Arrow file, flat buffer via pyarrow':<44}{'':>12}{'':>13}{arrow_read * 1e6:>16.1f} us")
    print(f"datasets also converted the jsonl to Arrow first: {load_s:.1f} s (not in its tokens/s; "
          f"{hf_tokens / (load_s + map_s):,.0f} tokens/s with it), a {raw_copy_mib:.1f} MiB copy of the text on disk")


if __name__ == "__main__":
    main()
