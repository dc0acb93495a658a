"""Out-of-domain evaluation text: Debian's reference manual (``debian-reference-<x>``, GPL-2+), HTML prose about
administering a Debian system, a domain that no training text of the built-in corpus (LibreOffice help and UI
strings) uses. Fetched like the LibreOffice corpus (``apt-get download`` + ``dpkg-deb -x``, never installed).

Each ``<p>`` paragraph of the manual's chapters is one document (whitespace collapsed; paragraphs under
``MIN_CHARACTERS`` or without letters dropped; duplicates dropped). In a translation, paragraphs identical to an
English one are untranslated and dropped. Layout under ``cache_dir/"debian-reference"``::

    packages/<package>.v<N>.json   the parsed paragraphs of one package
    <codes joined by '-'>/         one finished build: docs/<lang>.jsonl ({"id", "text"}), manifest.json

The evaluate stage removes, per run, the paragraphs that also occur in the language's training text
(:func:`pipeline.corpus.ood_documents`).
"""

from __future__ import annotations

import json
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Sequence

from pipeline import atomic, log
from pipeline.errors import LayerMoEError
from pipeline.libreoffice_corpus import CorpusBuild, Extractor, apt_extract, has_text

FORMAT_VERSION = 1  # of the parsed per-package caches and of a finished build
MIN_CHARACTERS = 40  # shorter paragraphs (headings, table-of-contents labels, bare commands) are dropped

DEBIAN_REFERENCE_PACKAGES: dict[str, str] = {
    "en": "debian-reference-en", "es": "debian-reference-es", "zh": "debian-reference-zh-cn",
    "de": "debian-reference-de", "fr": "debian-reference-fr", "it": "debian-reference-it",
    "ja": "debian-reference-ja", "pt": "debian-reference-pt", "id": "debian-reference-id",
}


class OodCorpus(CorpusBuild):
    """The Debian reference build: paragraph documents per language."""


class _ParagraphParser(HTMLParser):
    """The text of every ``<p>`` element (inline markup included), in document order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._depth = 0
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "p":
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "p" and self._depth:
            self._depth -= 1
            if not self._depth:
                self.paragraphs.append(" ".join("".join(self._text).split()))
                self._text = []

    def handle_data(self, data: str) -> None:
        if self._depth:
            self._text.append(data)


def parse_paragraphs(html: str) -> list[str]:
    """The prose paragraphs of one HTML page: ``<p>`` texts, whitespace collapsed, at least ``MIN_CHARACTERS``
    long and with letters, in page order."""
    parser = _ParagraphParser()
    parser.feed(html)
    parser.close()
    return [p for p in parser.paragraphs if len(p) >= MIN_CHARACTERS and has_text(p)]


def read_manual(root: Path, package: str) -> list[str]:
    """Extracted ``debian-reference-<x>`` package -> its distinct paragraphs, chapter by chapter."""
    pages = sorted((root / "usr/share/debian-reference").glob("*.html"))
    if not pages:
        raise LayerMoEError(f"{package}: no HTML pages under usr/share/debian-reference in the package")
    return list(dict.fromkeys(p for page in pages for p in parse_paragraphs(page.read_text("utf-8"))))


def _load_package(package: str, cache: Path, extract: Extractor) -> dict:
    """``{"package", "version", "paragraphs"}`` of one package, from the cache or fetched with ``extract``."""
    path = cache / "packages" / f"{package}.v{FORMAT_VERSION}.json"
    if path.exists():
        return json.loads(path.read_text("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{package}.") as tmp:
        root = Path(tmp) / "root"
        version = extract(package, root)
        content = {"package": package, "version": version, "paragraphs": read_manual(root, package)}
    atomic.write_text(path, json.dumps(content, ensure_ascii=False))
    log.info(f"parsed {package}: {len(content['paragraphs'])} paragraphs")
    return content


def build_from_packages(languages: Sequence[str], cache_dir: Path, extract: Extractor) -> OodCorpus:
    """Build (or reuse) the out-of-domain corpus of ``languages``, fetching packages with ``extract``."""
    unknown = [lang for lang in languages if lang not in DEBIAN_REFERENCE_PACKAGES]
    if unknown or not languages:
        raise LayerMoEError(f"debian-reference corpus: {'no languages given' if not languages else f'no manual for {unknown}'}; "
                            f"available: {', '.join(DEBIAN_REFERENCE_PACKAGES)}")
    langs = tuple(dict.fromkeys(languages))
    cache = Path(cache_dir) / "debian-reference"
    corpus = OodCorpus(cache / "-".join(sorted(langs)), langs)
    manifest = corpus.manifest_path
    if manifest.exists() and json.loads(manifest.read_text("utf-8")).get("format") == FORMAT_VERSION:
        return corpus
    log.info(f"building the out-of-domain (debian-reference) corpus for {', '.join(langs)} in {corpus.root}")
    contents = {lang: _load_package(DEBIAN_REFERENCE_PACKAGES[lang], cache, extract) for lang in ("en", *langs)}
    english = set(contents["en"]["paragraphs"])
    stats = {}
    with atomic.atomic_directory(corpus.root) as tmp:
        staged = OodCorpus(tmp, langs)
        for lang in langs:
            paragraphs = [p for p in contents[lang]["paragraphs"] if lang == "en" or p not in english]
            path = staged.documents_path(lang)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"id": f"{DEBIAN_REFERENCE_PACKAGES[lang]}#{i}", "text": text},
                                               ensure_ascii=False) + "\n" for i, text in enumerate(paragraphs)),
                            encoding="utf-8")
            stats[lang] = {"documents": len(paragraphs), "characters": sum(map(len, paragraphs)),
                           "bytes": path.stat().st_size}
            log.info(f"  {lang}: {len(paragraphs)} paragraphs, {stats[lang]['characters']:,} characters")
        atomic.write_json(staged.manifest_path, {
            "format": FORMAT_VERSION, "languages": list(langs), "stats": stats,
            "packages": {contents[lang]["package"]: contents[lang]["version"] for lang in ("en", *langs)}})
    return corpus


def build_debian_reference_corpus(languages: Sequence[str], cache_dir: Path) -> OodCorpus:
    """Download (apt) the ``debian-reference-<x>`` manuals of ``languages`` (and English, to recognise
    untranslated paragraphs) and build the out-of-domain corpus, cached."""
    return build_from_packages(languages, cache_dir, apt_extract)
