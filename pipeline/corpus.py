"""Per-language text corpora: local jsonl / plain text / parquet / saved ``datasets`` datasets, or the
built-in LibreOffice corpus, read with the ``datasets`` library and split deterministically into train and
held-out documents.

The split is decided per document by a keyed hash of its text, so it is the same on every machine, in every
process and in streaming mode, and a document that occurs twice never lands on both sides.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from pipeline.config import RunConfig, SourceConfig
from pipeline.errors import LayerMoEError
from pipeline.libreoffice_corpus import build_libreoffice_corpus

Split = Literal["train", "heldout"]

_EXTENSION_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "text", ".text": "text", ".parquet": "parquet"}


@dataclass(frozen=True)
class LanguageSource:
    """A resolved source: where one language's documents are and how to read them."""

    language: str
    path: Path
    format: str  # jsonl | text | parquet | dataset
    field: str = "text"
    text_sample_by: str = "paragraph"


def infer_format(path: Path) -> str:
    """The corpus format of ``path``: a saved ``datasets`` directory, or by file extension."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "dataset"
        exts = {p.suffix for p in path.iterdir() if p.is_file() and not p.name.startswith(".")}
        formats = {_EXTENSION_FORMATS[e] for e in exts if e in _EXTENSION_FORMATS}
        if len(formats) == 1:
            return formats.pop()
        raise LayerMoEError(f"cannot tell the format of corpus directory {str(path)!r}: set format explicitly")
    fmt = _EXTENSION_FORMATS.get(path.suffix)
    if fmt is None:
        raise LayerMoEError(f"cannot tell the format of corpus file {str(path)!r} from its extension; "
                            f"set format to one of jsonl, text, parquet, dataset")
    return fmt


def resolve_source(config: RunConfig, language: str) -> LanguageSource:
    """Where ``language``'s text comes from: its ``data.sources`` entry, else the built-in corpus."""
    src: SourceConfig | None = config.data.sources.get(language)
    if src is not None:
        path = Path(src.path).expanduser()
        if not path.exists():
            raise LayerMoEError(f"data.sources.{language}.path: corpus {str(path)!r} does not exist")
        fmt = infer_format(path) if src.format == "auto" else src.format
        return LanguageSource(language, path, fmt, src.field, src.text_sample_by)
    corpus = builtin_corpus(config)
    if corpus is not None:
        return LanguageSource(language, corpus.documents_path(language), "jsonl")
    raise LayerMoEError(f"language {language!r} has no data.sources entry and the built-in corpus is off")


def builtin_corpus(config: RunConfig):
    """The built-in LibreOffice corpus for every run language without a ``data.sources`` entry (built on first
    use, then cached), or None when the built-in corpus is off."""
    if config.data.builtin_corpus != "libreoffice":
        return None
    languages = tuple(lang for lang in config.all_languages() if lang not in config.data.sources)
    return _builtin_corpus(languages, config.cache_path)


@functools.lru_cache(maxsize=4)
def _builtin_corpus(languages: tuple[str, ...], cache_dir: Path):
    return build_libreoffice_corpus(languages, cache_dir)


def _data_files(path: Path) -> list[str]:
    if path.is_dir():
        return sorted(str(p) for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [str(path)]


def _raw_texts(source: LanguageSource) -> Iterator[str]:
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if source.format == "dataset":
        ds = datasets.load_from_disk(str(source.path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise LayerMoEError(f"saved dataset {str(source.path)!r} has no 'train' split: {list(ds)}")
            ds = ds["train"]
    else:
        builder = {"jsonl": "json", "text": "text", "parquet": "parquet"}[source.format]
        kwargs = {"sample_by": source.text_sample_by} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=_data_files(source.path), split="train",
                                   streaming=True, **kwargs)
    column = "text" if source.format == "text" else source.field
    try:
        for row in ds:
            if column not in row:
                raise LayerMoEError(f"corpus {str(source.path)!r} for {source.language!r}: records have no "
                                    f"field {column!r} (fields: {sorted(row)}); set data.sources.{source.language}.field")
            yield row[column]
    except LayerMoEError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files
        raise LayerMoEError(f"cannot read corpus {str(source.path)!r} for {source.language!r}: {e}") from e


def is_heldout(text: str, fraction: float, seed: int) -> bool:
    """Deterministic split membership of one document (same text -> same answer everywhere)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def iter_split_documents(source: LanguageSource, heldout_fraction: float, seed: int) -> Iterator[tuple[Split, str]]:
    """Stream every non-empty document (surrounding whitespace stripped) with its split, in corpus order.
    An empty corpus is an error."""
    any_text = False
    for text in _raw_texts(source):
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            continue
        any_text = True
        yield ("heldout" if is_heldout(text, heldout_fraction, seed) else "train"), text
    if not any_text:
        raise LayerMoEError(f"language {source.language!r}: corpus {str(source.path)!r} has no non-empty documents")


def source_size(source: LanguageSource) -> int:
    """Bytes on disk of the files a source reads (for progress estimates)."""
    return sum(Path(f).stat().st_size for f in _data_files(source.path))
