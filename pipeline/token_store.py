"""Token stores on disk: one language split, tokenized once, read from disk on demand (never all in RAM).

A store is a directory ``<cache>/tokens/<language>-<split>-<key digest>/`` named by everything that decides its
content (:class:`StoreKey`): the tokenizer's files, the source's content, the split settings, the encoding rule
and this format's version. So runs and rounds share it, and an expanded model (which copies the tokenizer files)
finds the store its base model's run made. Layout (numpy ``.npy`` files, as Megatron and nanoGPT keep token ids)::

    meta.json      key, counts of documents and tokens, dtype, vocab size, created_at
    ids.npy        the token ids of all documents, concatenated (uint16, or uint32 above 65,535 ids)
    offsets.npy    int64 [documents + 1]: document d is ids[offsets[d]:offsets[d + 1]]
    separator.npy  bool [documents]: an EOS was appended to the tokenizer's output as the separator

The token stream ``ids`` is every document encoded by the rule :data:`ENCODING` (``packing.needs_separator``), in
corpus order: what packing the documents in memory gave (``tests/reference_data.py`` keeps that as the reference).
Readers ``pread`` token ranges from ``ids.npy`` (a training process's memory stays flat however much it has read: a
memory map would keep every page it touched mapped) and memory-map the small arrays. While a store is being made,
its documents collect in parts of the same three arrays (``part-<i>/`` of a work directory, see
``tokenize_corpus``); :func:`concatenate_parts` joins them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import read_json
from pipeline.errors import LayerMoEError
from pipeline.manifest import hash_file

FORMAT_VERSION = 1
# part of every store's key; the name is the one of the function that first implemented it (now tests/reference_data.py)
ENCODING = "encode_document/1: BOS if the tokenizer adds one, the text, EOS appended unless the text ends with it"
META = "meta.json"
# Files that decide how a tokenizer encodes text (an expanded model copies them byte for byte).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")
_COPY_CHUNK = 16 * 2**20


def tokenizer_fingerprint(path: Path) -> str:
    """sha256 over the tokenizer files of a model directory (or of a bare SentencePiece model file)."""
    path = Path(path)
    files = [path] if path.is_file() else [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not files:
        raise LayerMoEError(f"no tokenizer files in {str(path)!r} (expected one of {', '.join(TOKENIZER_FILES)})")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{hash_file(f)}\n".encode())
    return h.hexdigest()


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id: uint16 up to 65,535 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65_535 else np.dtype(np.uint32)


@dataclass(frozen=True)
class StoreKey:
    """Everything that decides a store's content; its digest names the store's directory."""

    language: str
    split: str
    tokenizer: str  # tokenizer_fingerprint
    tokenizer_backend: str
    source: str  # manifest.hash_path of the corpus file or directory
    source_format: str
    source_field: str
    text_sample_by: str
    heldout_fraction: float
    split_seed: int
    encoding: str = ENCODING
    format_version: int = FORMAT_VERSION

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()

    @property
    def dirname(self) -> str:
        return f"{self.language}-{self.split}-{self.digest()[:20]}"


@dataclass(frozen=True)
class StoreMeta:
    """The content of ``meta.json``."""

    key: StoreKey
    documents: int
    tokens: int
    dtype: str
    vocab_size: int
    source_path: str
    created_at: str

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, "key": dataclasses.asdict(self.key), "digest": self.key.digest(),
                "documents": self.documents, "tokens": self.tokens, "dtype": self.dtype,
                "vocab_size": self.vocab_size, "tokenizer_fingerprint": self.key.tokenizer,
                "source_path": self.source_path, "created_at": self.created_at}

    @classmethod
    def read(cls, store_dir: Path) -> StoreMeta:
        path = Path(store_dir) / META
        data = read_json(path, "token store metadata")
        try:
            if data["format_version"] != FORMAT_VERSION:
                raise LayerMoEError(f"token store {str(store_dir)!r} has format version {data['format_version']}, "
                                    f"this code reads version {FORMAT_VERSION}")
            return cls(StoreKey(**data["key"]), int(data["documents"]), int(data["tokens"]), data["dtype"],
                       int(data["vocab_size"]), data["source_path"], data["created_at"])
        except (KeyError, TypeError, ValueError) as e:
            raise LayerMoEError(f"token store metadata {path} is corrupt ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------- arrays on disk


@dataclass(frozen=True)
class ArrayFile:
    """A checked 1-d ``.npy`` file: where its data start and how many items it holds."""

    path: Path
    dtype: np.dtype
    length: int
    data_offset: int

    def map(self) -> np.ndarray:
        """The array memory-mapped read-only (for the small per-document arrays)."""
        if self.length == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.data_offset, shape=(self.length,))


def write_arrays(directory: Path, ids: np.ndarray, lengths: np.ndarray, separator: np.ndarray) -> None:
    """Write a part's three arrays into ``directory``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    for name, array in (("ids.npy", ids), ("offsets.npy", offsets), ("separator.npy", separator.astype(np.bool_))):
        with (directory / name).open("wb") as f:
            np.save(f, array, allow_pickle=False)


def _read_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and data offset of a ``.npy`` file; a missing or unreadable header is an error."""
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            return shape, fortran, dtype, f.tell()
    except FileNotFoundError:
        raise LayerMoEError(f"token store file {path} is missing") from None
    except (ValueError, OSError, SyntaxError) as e:
        raise LayerMoEError(f"token store file {path} is corrupt (unreadable header: {e})") from None


def check_array(path: Path, dtype: np.dtype, length: int | None = None) -> ArrayFile:
    """Check a 1-d ``.npy`` file's header (dtype; length, if given) and its exact size on disk."""
    shape, fortran, file_dtype, header_end = _read_header(path)
    if file_dtype != dtype or len(shape) != 1 or fortran or (length is not None and shape[0] != length):
        expected = f"{dtype} ({'n' if length is None else length},)"
        raise LayerMoEError(f"token store file {path} is corrupt: holds {file_dtype} {shape}, expected {expected}")
    expected_size = header_end + shape[0] * dtype.itemsize
    size = path.stat().st_size
    if size != expected_size:
        raise LayerMoEError(f"token store file {path} is {'truncated' if size < expected_size else 'corrupt'}: "
                            f"{size:,} bytes, expected {expected_size:,}")
    return ArrayFile(path, dtype, shape[0], header_end)


@dataclass(frozen=True)
class TokenArrays:
    """The three arrays of a store or of one part, checked against each other: the ids file (read on demand), the
    document offsets and separator flags (memory-mapped)."""

    ids: ArrayFile
    offsets: np.ndarray
    separator: np.ndarray

    @property
    def documents(self) -> int:
        return len(self.separator)

    @property
    def tokens(self) -> int:
        return self.ids.length


def open_arrays(directory: Path, dtype: np.dtype, documents: int | None = None,
                tokens: int | None = None) -> TokenArrays:
    """Check the three arrays in ``directory`` (headers, sizes, each other, the counts given) and open them."""
    ids = check_array(directory / "ids.npy", dtype, tokens)
    separator = check_array(directory / "separator.npy", np.dtype(np.bool_), documents).map()
    offsets = check_array(directory / "offsets.npy", np.dtype(np.int64), len(separator) + 1).map()
    if offsets[0] != 0 or offsets[-1] != ids.length:
        raise LayerMoEError(f"token store {directory} is corrupt: document offsets run from {int(offsets[0])} to "
                            f"{int(offsets[-1])}, expected 0 to {ids.length}")
    return TokenArrays(ids, offsets, separator)


def concatenate_parts(parts: list[Path], out_dir: Path, dtype: np.dtype) -> tuple[int, int]:
    """Join the parts' arrays, in order, into one set of arrays in ``out_dir``; returns (documents, tokens).
    Each part is checked first; data are copied file to file, never the whole store in memory."""
    arrays = [open_arrays(part, dtype) for part in parts]
    documents, tokens = sum(a.documents for a in arrays), sum(a.tokens for a in arrays)
    with (out_dir / "ids.npy").open("wb") as f:
        _write_header(f, dtype, tokens)
        for a in arrays:
            with a.ids.path.open("rb") as part:
                part.seek(a.ids.data_offset)
                shutil.copyfileobj(part, f, _COPY_CHUNK)
    with (out_dir / "separator.npy").open("wb") as f:
        _write_header(f, np.dtype(np.bool_), documents)
        for a in arrays:
            f.write(np.ascontiguousarray(a.separator).tobytes())
    with (out_dir / "offsets.npy").open("wb") as f:
        _write_header(f, np.dtype(np.int64), documents + 1)
        base = 0
        f.write(np.zeros(1, dtype=np.int64).tobytes())
        for a in arrays:
            f.write((a.offsets[1:] + base).astype(np.int64).tobytes())
            base += a.tokens
    return documents, tokens


def _write_header(f, dtype: np.dtype, length: int) -> None:
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                             "shape": (length,)})


# ------------------------------------------------------------------------------------------- reader


class TokenStore:
    """A finished store. Token ids are read from disk on demand (``pread``: only the bytes asked for, and they do not
    stay mapped into the process, so its memory does not grow with the tokens it has read); the per-document
    offsets and flags are memory-mapped. Never the whole corpus in RAM."""

    def __init__(self, path: Path, meta: StoreMeta, arrays: TokenArrays):
        self.path = path
        self.meta = meta
        self._arrays = arrays
        self._ids = arrays.ids.path.open("rb")

    @classmethod
    def open(cls, path: Path, expected: StoreKey | None = None, tokenizer: Path | None = None) -> TokenStore:
        """Open the store in ``path``, checking headers and sizes. With ``expected`` it must have been made from
        exactly those inputs; with ``tokenizer`` (a model directory or tokenizer file), with that tokenizer. A store
        made with another tokenizer, source or split settings is an error."""
        path = Path(path)
        if not path.is_dir():
            raise LayerMoEError(f"token store {str(path)!r} does not exist; run the tokenize stage (layermoe tokenize "
                                f"CONFIG)")
        try:
            meta = StoreMeta.read(path)
            dtype = np.dtype(meta.dtype)
            if dtype != id_dtype(meta.vocab_size):
                raise LayerMoEError(f"token store {path}: dtype {meta.dtype} does not fit vocab size {meta.vocab_size}")
            arrays = open_arrays(path, dtype, meta.documents, meta.tokens)
        except LayerMoEError as e:  # a damaged store: say how to get a good one
            raise LayerMoEError(f"{e}; delete {path} and run the tokenize stage again") from None
        if expected is not None and meta.key != expected:
            raise LayerMoEError(_mismatch(path, meta.key, expected))
        if tokenizer is not None:
            fingerprint = tokenizer_fingerprint(tokenizer)
            if meta.key.tokenizer != fingerprint:
                raise LayerMoEError(_mismatch(path, meta.key, dataclasses.replace(meta.key, tokenizer=fingerprint)))
        return cls(path, meta, arrays)

    @property
    def num_documents(self) -> int:
        return self._arrays.documents

    @property
    def num_tokens(self) -> int:
        return self._arrays.tokens

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i``: the tokenizer's, then the separator if one was appended (:data:`ENCODING`)."""
        self._check_document(i)
        return self.tokens(int(self._arrays.offsets[i]), int(self._arrays.offsets[i + 1]))

    def text_ids(self, i: int) -> np.ndarray:
        """What the tokenizer alone gives for document ``i``: ``document(i)`` without the appended separator."""
        self._check_document(i)
        end = int(self._arrays.offsets[i + 1]) - (1 if self._arrays.separator[i] else 0)
        return self.tokens(int(self._arrays.offsets[i]), end)

    def _check_document(self, i: int) -> None:
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} of a store with {self.num_documents} documents")

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the store's stream (all documents concatenated in corpus order), read-only."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) of a store with {self.num_tokens} tokens")
        ids = self._arrays.ids
        offset, size = ids.data_offset + start * ids.dtype.itemsize, (stop - start) * ids.dtype.itemsize
        chunks = []
        while size > 0:  # one read unless it is larger than the OS gives at once (2 GiB on Linux)
            chunk = os.pread(self._ids.fileno(), size, offset)
            if not chunk:
                raise LayerMoEError(f"token store file {ids.path} was truncated while in use")
            chunks.append(chunk)
            offset, size = offset + len(chunk), size - len(chunk)
        return np.frombuffer(chunks[0] if len(chunks) == 1 else b"".join(chunks), dtype=ids.dtype)


def _mismatch(path: Path, found: StoreKey, expected: StoreKey) -> str:
    if found.tokenizer != expected.tokenizer:
        return (f"token store {path} was made with another tokenizer (fingerprint {found.tokenizer[:12]}, "
                f"this model's is {expected.tokenizer[:12]})")
    fields = [f.name for f in dataclasses.fields(StoreKey) if getattr(found, f.name) != getattr(expected, f.name)]
    return (f"token store {path} was made from other inputs: " +
            ", ".join(f"{name} {getattr(found, name)!r} (expected {getattr(expected, name)!r})" for name in fields))
