"""The tokenize stage's artifact ``stores.json``: which token store (``pipeline/token_store.py``) holds each
(language, split) a round's later stages read, and the tokenizer they were all made with.

Every consumer (analyze, upcycle's check, both training stages, evaluate) reads its tokens through this file, so
none of them hashes or reads a corpus again: a store's key digest stands for the source's content, the split
settings and the tokenizer, and the small ``stores.json`` is the consumers' manifest input in place of the corpora.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import read_json, write_json
from pipeline.corpus import Split
from pipeline.errors import LayerMoEError
from pipeline.token_store import TokenStore, tokenizer_fingerprint

STORES_FILE = "stores.json"


@dataclass(frozen=True)
class StoreEntry:
    """One store of ``stores.json``: where it is, its key digest and what it holds."""

    language: str
    split: Split
    path: Path
    digest: str
    documents: int
    tokens: int
    dtype: str

    @classmethod
    def of(cls, language: str, split: Split, store: TokenStore) -> StoreEntry:
        return cls(language, split, store.path, store.meta.key.digest(), store.num_documents, store.num_tokens,
                   store.meta.dtype)

    def to_json(self) -> dict:
        return {"language": self.language, "split": self.split, "path": str(self.path), "digest": self.digest,
                "documents": self.documents, "tokens": self.tokens, "dtype": self.dtype}


@dataclass(frozen=True)
class StoreIndex:
    """The content of ``stores.json``: the fingerprint of the tokenizer and one entry per (language, split)."""

    tokenizer: str  # token_store.tokenizer_fingerprint
    entries: tuple[StoreEntry, ...]
    source: Path | None = None  # the file it was read from (for messages)

    def write(self, path: Path) -> None:
        write_json(path, {"tokenizer_fingerprint": self.tokenizer, "stores": [e.to_json() for e in self.entries]})

    @classmethod
    def load(cls, path: Path) -> StoreIndex:
        """``stores.json`` at ``path`` as it is; a missing or corrupt file is an error."""
        data = read_json(path, "token store list", "; run the tokenize stage first (layermoe tokenize CONFIG)")
        try:
            entries = tuple(StoreEntry(e["language"], e["split"], Path(e["path"]), e["digest"], int(e["documents"]),
                                       int(e["tokens"]), e["dtype"]) for e in data["stores"])
            return cls(data["tokenizer_fingerprint"], entries, Path(path))
        except (KeyError, TypeError, ValueError) as e:
            raise LayerMoEError(f"token store list {path} is corrupt ({type(e).__name__}: {e}); run the tokenize "
                                f"stage again (layermoe tokenize CONFIG --force)") from None

    @classmethod
    def read(cls, path: Path, tokenizer: Path) -> StoreIndex:
        """``stores.json`` at ``path``, checked to list stores of the tokenizer in ``tokenizer`` (a model directory)."""
        index = cls.load(path)
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint != index.tokenizer:
            raise LayerMoEError(f"the token stores in {path} were made with another tokenizer (fingerprint "
                                f"{index.tokenizer[:12]}) than {tokenizer}'s ({fingerprint[:12]}); run the tokenize "
                                f"stage again (layermoe tokenize CONFIG --force)")
        return index

    def entry(self, language: str, split: Split) -> StoreEntry:
        for e in self.entries:
            if (e.language, e.split) == (language, split):
                return e
        raise LayerMoEError(f"{self.source or STORES_FILE} lists no {split} store for language {language!r}; run "
                            f"the tokenize stage again (layermoe tokenize CONFIG --force)")

    def open(self, language: str, split: Split) -> TokenStore:
        """The store of ``language``'s ``split``, checked (headers, sizes) and checked to be the one listed."""
        entry = self.entry(language, split)
        store = TokenStore.open(entry.path)
        if store.meta.key.digest() != entry.digest:
            raise LayerMoEError(f"token store {entry.path} is not the one {self.source or STORES_FILE} lists (key "
                                f"digest {store.meta.key.digest()[:12]}, listed {entry.digest[:12]}); run the "
                                f"tokenize stage again (layermoe tokenize CONFIG --force)")
        return store

    def open_all(self, languages: list[str], split: Split) -> dict[str, TokenStore]:
        """The ``split`` stores of ``languages``, by language."""
        return {language: self.open(language, split) for language in languages}
