"""Token stores on disk: one language split, tokenized once, read in place through memory maps.

A store is a directory ``<cache>/tokens/<language>-<split>-<key digest>/`` named by everything that decides its
content (:class:`StoreKey`): the tokenizer's files, the source's content, the split settings, the encoding rule
and this format's version. So runs and rounds share it, and an expanded model (which copies the tokenizer files)
finds the store its base model's run made. Layout::

    meta.json              key, counts of documents and tokens per part, dtype, vocab size, created_at
    part-00000/ids.npy     token ids of the part's documents, concatenated (uint16, or uint32 above 65,535 ids)
    part-00000/offsets.npy int64 [documents + 1]: document d is ids[offsets[d]:offsets[d + 1]]
    part-00000/separator.npy bool [documents]: an EOS was appended to the tokenizer's output as the separator
    part-00001/ ...

Every part is a run of whole documents in corpus order, so the store's token stream (the parts one after the
other) is exactly what ``packing.iter_packed`` concatenates: ``packing.encode_document`` of each document. The
parts are kept as they were written (no concatenated copy); one reader maps global positions onto them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import read_json
from pipeline.errors import LayerMoEError
from pipeline.manifest import hash_file

FORMAT_VERSION = 1
ENCODING = "encode_document/1: BOS if the tokenizer adds one, the text, EOS appended unless the text ends with it"
META = "meta.json"
PART_FILES = ("ids.npy", "offsets.npy", "separator.npy")
# Files that decide how a tokenizer encodes text (an expanded model copies them byte for byte).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")


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


def part_name(index: int) -> str:
    return f"part-{index:05d}"


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
    shard_chars: int  # documents are cut into parts of about this many characters
    encoding: str = ENCODING
    format_version: int = FORMAT_VERSION

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()

    @property
    def dirname(self) -> str:
        return f"{self.language}-{self.split}-{self.digest()[:20]}"


@dataclass(frozen=True)
class PartInfo:
    documents: int
    tokens: int


@dataclass(frozen=True)
class StoreMeta:
    """The content of ``meta.json``."""

    key: StoreKey
    dtype: str
    vocab_size: int
    parts: tuple[PartInfo, ...]
    source_path: str
    created_at: str

    @property
    def documents(self) -> int:
        return sum(p.documents for p in self.parts)

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.parts)

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, "key": dataclasses.asdict(self.key), "digest": self.key.digest(),
                "documents": self.documents, "tokens": self.tokens, "dtype": self.dtype,
                "vocab_size": self.vocab_size, "tokenizer_fingerprint": self.key.tokenizer,
                "source_path": self.source_path, "parts": [dataclasses.asdict(p) for p in self.parts],
                "created_at": self.created_at}

    @classmethod
    def read(cls, store_dir: Path) -> StoreMeta:
        path = Path(store_dir) / META
        data = read_json(path, "token store metadata")
        try:
            if data["format_version"] != FORMAT_VERSION:
                raise LayerMoEError(f"token store {str(store_dir)!r} has format version {data['format_version']}, "
                                    f"this code reads version {FORMAT_VERSION}; delete it to tokenize again")
            return cls(StoreKey(**data["key"]), data["dtype"], int(data["vocab_size"]),
                       tuple(PartInfo(int(p["documents"]), int(p["tokens"])) for p in data["parts"]),
                       data["source_path"], data["created_at"])
        except (KeyError, TypeError, ValueError) as e:
            raise LayerMoEError(f"token store metadata {path} is corrupt ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------- parts


def write_part(part_dir: Path, ids: np.ndarray, lengths: np.ndarray, separator: np.ndarray) -> None:
    """Write one part's three arrays into the (new, empty) directory ``part_dir``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    for name, array in zip(PART_FILES, (ids, offsets, separator.astype(np.bool_))):
        with (part_dir / name).open("wb") as f:
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


def _open_array(path: Path, dtype: np.dtype, length: int) -> np.ndarray:
    """Memory-map a 1-d ``.npy`` file, checking its header (dtype, length) and its exact size on disk."""
    shape, fortran, file_dtype, header_end = _read_header(path)
    if file_dtype != dtype or shape != (length,) or fortran:
        raise LayerMoEError(f"token store file {path} is corrupt: holds {file_dtype} {shape}, "
                            f"meta.json says {dtype} ({length},)")
    expected = header_end + length * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise LayerMoEError(f"token store file {path} is {'truncated' if size < expected else 'corrupt'}: "
                            f"{size:,} bytes, expected {expected:,}")
    if length == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=header_end, shape=(length,))


@dataclass(frozen=True)
class _Part:
    ids: np.ndarray
    offsets: np.ndarray
    separator: np.ndarray


def open_part(part_dir: Path, info: PartInfo, dtype: np.dtype) -> _Part:
    """Memory-map one part, checking sizes and the ends of its document offsets."""
    ids = _open_array(part_dir / "ids.npy", dtype, info.tokens)
    offsets = _open_array(part_dir / "offsets.npy", np.dtype(np.int64), info.documents + 1)
    separator = _open_array(part_dir / "separator.npy", np.dtype(np.bool_), info.documents)
    if offsets[0] != 0 or offsets[-1] != info.tokens:
        raise LayerMoEError(f"token store part {part_dir} is corrupt: document offsets run from {int(offsets[0])} "
                            f"to {int(offsets[-1])}, expected 0 to {info.tokens}")
    return _Part(ids, offsets, separator)


def read_part_info(part_dir: Path) -> PartInfo:
    """Counts of a finished part, from its array headers (checked when the store is opened)."""
    tokens = _read_header(part_dir / "ids.npy")[0]
    documents = _read_header(part_dir / "separator.npy")[0]
    return PartInfo(documents=int(documents[0]), tokens=int(tokens[0]))


# ------------------------------------------------------------------------------------------- reader


class TokenStore:
    """A finished store, memory-mapped: documents and token ranges are read in place, never all into RAM."""

    def __init__(self, path: Path, meta: StoreMeta, parts: list[_Part]):
        self.path = path
        self.meta = meta
        self._parts = parts
        self._doc_starts = np.cumsum([0] + [p.documents for p in meta.parts], dtype=np.int64)
        self._token_starts = np.cumsum([0] + [p.tokens for p in meta.parts], dtype=np.int64)

    @classmethod
    def open(cls, path: Path, expected: StoreKey | None = None) -> TokenStore:
        """Open the store in ``path``; with ``expected``, it must have been made from exactly those inputs (a store
        made with another tokenizer, source or split settings is an error). Sizes and headers are checked."""
        path = Path(path)
        if not path.is_dir():
            raise LayerMoEError(f"token store {str(path)!r} does not exist")
        meta = StoreMeta.read(path)
        if expected is not None and meta.key != expected:
            raise LayerMoEError(_mismatch(path, meta.key, expected))
        dtype = np.dtype(meta.dtype)
        if dtype != id_dtype(meta.vocab_size):
            raise LayerMoEError(f"token store {path}: dtype {meta.dtype} does not fit vocab size {meta.vocab_size}")
        parts = [open_part(path / part_name(i), info, dtype) for i, info in enumerate(meta.parts)]
        return cls(path, meta, parts)

    @property
    def num_documents(self) -> int:
        return int(self._doc_starts[-1])

    @property
    def num_tokens(self) -> int:
        return int(self._token_starts[-1])

    @property
    def language(self) -> str:
        return self.meta.key.language

    def _locate_document(self, i: int) -> tuple[_Part, int]:
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} of a store with {self.num_documents} documents")
        p = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        return self._parts[p], i - int(self._doc_starts[p])

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` as ``packing.encode_document`` gives them (a read-only view)."""
        part, d = self._locate_document(i)
        return part.ids[part.offsets[d]:part.offsets[d + 1]]

    def text_ids(self, i: int) -> np.ndarray:
        """What the tokenizer alone gives for document ``i``: ``document(i)`` without the appended separator."""
        part, d = self._locate_document(i)
        end = part.offsets[d + 1] - (1 if part.separator[d] else 0)
        return part.ids[part.offsets[d]:end]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the store's stream (all documents concatenated in corpus order)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) of a store with {self.num_tokens} tokens")
        pieces = []
        p = int(np.searchsorted(self._token_starts, start, side="right")) - 1
        while start < stop:
            local = start - int(self._token_starts[p])
            take = min(stop, int(self._token_starts[p + 1])) - start
            pieces.append(self._parts[p].ids[local:local + take])
            start += take
            p += 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.dtype(self.meta.dtype))


def _mismatch(path: Path, found: StoreKey, expected: StoreKey) -> str:
    if found.tokenizer != expected.tokenizer:
        return (f"token store {path} was made with another tokenizer (fingerprint {found.tokenizer[:12]}, "
                f"this model's is {expected.tokenizer[:12]})")
    fields = [f.name for f in dataclasses.fields(StoreKey) if getattr(found, f.name) != getattr(expected, f.name)]
    return (f"token store {path} was made from other inputs: " +
            ", ".join(f"{name} {getattr(found, name)!r} (expected {getattr(expected, name)!r})" for name in fields))
