"""Offline multilingual corpus from LibreOffice's Debian help and UI-translation packages (MPL-2.0).

Help pages (``libreoffice-help-<x>``) give prose; their paragraphs carry the same ``id`` in every
language, so they also align into parallel text. UI translations (``libreoffice-l10n-<x>``) give
short strings keyed by ``CONTEXT\\x04English``; they are the only source for some languages (bn, ne).

Layout under ``cache_dir/"libreoffice"``::

    packages/<package>.v<N>.json   parsed content of one package (help paragraphs or UI strings)
    <codes joined by '-'>/         one finished build: docs/<lang>.jsonl, parallel.jsonl, manifest.json
"""

from __future__ import annotations

import gettext
import io
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from pipeline import atomic, log
from pipeline.errors import LayerMoEError

FORMAT_VERSION = 1  # of the parsed per-package caches
BUILD_VERSION = 2  # of a finished build (2: UI strings split into documents of UI_LINES_PER_DOCUMENT lines)
UI_LINES_PER_DOCUMENT = 50  # small documents, so the hash-based held-out split also works for UI-only languages


class _Language(NamedTuple):
    name: str
    help_package: str | None
    ui_package: str | None


_LANGUAGES: dict[str, _Language] = {
    "en": _Language("English", "libreoffice-help-en-us", None),
    "es": _Language("Spanish", "libreoffice-help-es", "libreoffice-l10n-es"),
    "zh": _Language("Chinese", "libreoffice-help-zh-cn", "libreoffice-l10n-zh-cn"),
    "el": _Language("Greek", "libreoffice-help-el", "libreoffice-l10n-el"),
    "hu": _Language("Hungarian", "libreoffice-help-hu", "libreoffice-l10n-hu"),
    "tr": _Language("Turkish", "libreoffice-help-tr", "libreoffice-l10n-tr"),
    "hi": _Language("Hindi", "libreoffice-help-hi", "libreoffice-l10n-hi"),
    "bn": _Language("Bengali", None, "libreoffice-l10n-bn"),
    "ne": _Language("Nepali", None, "libreoffice-l10n-ne"),
    "de": _Language("German", "libreoffice-help-de", "libreoffice-l10n-de"),
    "fr": _Language("French", "libreoffice-help-fr", "libreoffice-l10n-fr"),
    "ru": _Language("Russian", "libreoffice-help-ru", "libreoffice-l10n-ru"),
    "ja": _Language("Japanese", "libreoffice-help-ja", "libreoffice-l10n-ja"),
    "ko": _Language("Korean", "libreoffice-help-ko", "libreoffice-l10n-ko"),
    "vi": _Language("Vietnamese", "libreoffice-help-vi", "libreoffice-l10n-vi"),
    "ar": _Language("Arabic", None, "libreoffice-l10n-ar"),
}

SUPPORTED_LANGUAGES: dict[str, str] = {code: lang.name for code, lang in _LANGUAGES.items()}

# English UI strings are the msgids; they are read from this (nearly complete) translation's .mo files.
ENGLISH_UI_REFERENCE = "libreoffice-l10n-es"

# Downloads ``package`` and unpacks its files into the (new) directory ``dest``; returns the package version.
Extractor = Callable[[str, Path], str]

HelpPages = dict[str, list[tuple[str, str]]]  # page path -> [(paragraph key, text)]
UiCatalogs = dict[str, dict[str, str]]  # .mo file name -> {"CONTEXT\x04English": translation}


@dataclass(frozen=True)
class CorpusBuild:
    """A finished build of a built-in corpus: one JSONL of ``{"id", "text"}`` documents per language and the
    build's manifest."""

    root: Path
    languages: tuple[str, ...]

    def documents_path(self, lang: str) -> Path:
        return self.root / "docs" / f"{lang}.jsonl"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"


class LibreOfficeCorpus(CorpusBuild):
    """The LibreOffice build: documents per language, plus parallel entries."""

    @property
    def parallel_path(self) -> Path:
        return self.root / "parallel.jsonl"


# ----------------------------------------------------------------------------------------------- parsing

_PARAGRAPH_TAGS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6"})
_VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"})
_PARAGRAPH_ID = re.compile(r"(par|hd)_id")


class _HelpPageParser(HTMLParser):
    """Collects the text of ``<p>``/``<h*>`` elements whose id starts with ``par_id`` or ``hd_id``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[tuple[str, str]] = []
        self._id: str | None = None
        self._tag = ""
        self._text: list[str] = []
        self._hidden_depth = 0  # > 0 inside a platform/application-specific alternative (e.g. the MAC keys)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            return
        attributes = dict(attrs)
        if self._id is not None and (self._hidden_depth or ("hidden" in attributes and attributes.get("class"))):
            self._hidden_depth += 1
            return
        if tag in _PARAGRAPH_TAGS and _PARAGRAPH_ID.match(attributes.get("id") or ""):
            self._finish()
            self._id, self._tag = attributes["id"], tag

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS:
            return
        if self._hidden_depth:
            self._hidden_depth -= 1
        elif self._id is not None and tag == self._tag:
            self._finish()

    def handle_data(self, data: str) -> None:
        if self._id is not None and not self._hidden_depth:
            self._text.append(data)

    def close(self) -> None:
        super().close()
        self._finish()

    def _finish(self) -> None:
        if self._id is not None:
            self.paragraphs.append((self._id, " ".join("".join(self._text).split())))
        self._id, self._text, self._hidden_depth = None, [], 0


def parse_help_page(html: str) -> list[tuple[str, str]]:
    """Help page HTML -> ``[(key, text)]`` in page order, whitespace collapsed, empty texts included.

    The key is the paragraph id; a page embeds sections of other pages, so an id can repeat: its n-th
    occurrence (n >= 2) gets the key ``"<id>#<n>"``. Of an inline platform switch (``switchinline``),
    only the default variant is kept.
    """
    parser = _HelpPageParser()
    parser.feed(html)
    parser.close()
    seen: dict[str, int] = {}
    keyed = []
    for pid, text in parser.paragraphs:
        seen[pid] = seen.get(pid, 0) + 1
        keyed.append((pid if seen[pid] == 1 else f"{pid}#{seen[pid]}", text))
    return keyed


def read_mo(data: bytes) -> dict[str, str]:
    """GNU .mo bytes -> ``{msgid: msgstr}`` without the header; plural entries keep their singular form."""
    catalog = gettext.GNUTranslations(io.BytesIO(data))._catalog  # type: ignore[attr-defined]
    entries: dict[str, str] = {}
    for key, value in catalog.items():
        if isinstance(key, tuple):
            key, index = key
            if index != 0:
                continue
        if key:
            entries[key] = value
    return entries


_CJK_MNEMONIC = re.compile(r"\s?\([_~][^\s)]\)")
_IDENTIFIER_UNDERSCORE = re.compile(r"[%$<]\w*_|[A-Z]_[A-Z]")  # %FILE_NAME, $error_message$, <wizard_name>, SUM_X


def clean_ui_string(text: str) -> str:
    """Drop keyboard-accelerator markers: ``~Open``, ``Categor_y``, ``保存(_S)`` -> ``Open``, ``Category``, ``保存``.

    A ``_`` is taken for a marker only when it is the string's single underscore and not part of an identifier.
    """
    text = _CJK_MNEMONIC.sub("", text).replace("~", "")
    if text.count("_") == 1 and not _IDENTIFIER_UNDERSCORE.search(text):
        text = re.sub(r"_(?=\w)", "", text)
    return text.strip()


def english_of(key: str) -> str:
    """The English source text of a UI key ``CONTEXT\\x04English``."""
    return key.split("\x04", 1)[-1]


def has_text(text: str) -> bool:
    """Whether a paragraph/string is real text, not empty or only numbers and symbols."""
    return any(ch.isalpha() for ch in text)


def _single_dir(pattern: str, root: Path, package: str) -> Path:
    found = sorted(p for p in root.glob(pattern) if p.is_dir())
    if len(found) != 1:
        raise LayerMoEError(f"{package}: expected one directory {pattern} in the package, found {len(found)}")
    return found[0]


def read_help_tree(root: Path, package: str) -> HelpPages:
    """Extracted help package -> ``{page path: [(key, text)]}`` (paths like ``text/swriter/guide/x.html``).

    Paragraphs without real text are dropped (after keying, so keys stay aligned across languages).
    """
    locale_dir = _single_dir("usr/share/libreoffice/help/*/text", root, package).parent
    pages: HelpPages = {}
    for path in sorted(locale_dir.glob("text/**/*.html")):
        paragraphs = [(key, text) for key, text in parse_help_page(path.read_text("utf-8")) if has_text(text)]
        if paragraphs:
            pages[path.relative_to(locale_dir).as_posix()] = paragraphs
    return pages


def read_ui_tree(root: Path, package: str) -> UiCatalogs:
    """Extracted l10n package -> ``{"<name>.mo": {key: cleaned translation}}``."""
    messages = _single_dir("usr/lib/libreoffice/program/resource/*/LC_MESSAGES", root, package)
    catalogs: UiCatalogs = {}
    for path in sorted(messages.glob("*.mo")):
        catalogs[path.name] = {k: clean_ui_string(v) for k, v in sorted(read_mo(path.read_bytes()).items())}
    if not catalogs:
        raise LayerMoEError(f"{package}: no .mo files under {messages}")
    return catalogs


# ---------------------------------------------------------------------------------------------- packages


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    return " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])


def apt_extract(package: str, dest: Path) -> str:
    """``apt-get download`` ``package`` (after one ``apt-get update`` if that fails) and ``dpkg-deb -x`` it."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise LayerMoEError(
                f"`{tool}` not found: the LibreOffice corpus needs a Debian/Ubuntu system to fetch {package}; "
                "run on such a system, or configure a corpus of your own instead of the built-in default"
            )
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download.") as tmp:
        download = _run(["apt-get", "download", package], cwd=Path(tmp))
        if download.returncode != 0:
            log.info(f"apt-get download {package} failed ({_tail(download)}); running apt-get update and retrying")
            update = _run(["apt-get", "update"])
            download = _run(["apt-get", "download", package], cwd=Path(tmp))
            if download.returncode != 0:
                raise LayerMoEError(
                    f"cannot download Debian package {package}: {_tail(download)} "
                    f"(apt-get update: {'ok' if update.returncode == 0 else _tail(update)}). "
                    "Check that apt can reach a Debian mirror (e.g. run `apt-get update` as root), "
                    "or drop the language that needs it"
                )
        (deb,) = Path(tmp).glob(f"{package}_*.deb")
        version = _run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()
        extract = _run(["dpkg-deb", "-x", str(deb), str(dest)])
        if extract.returncode != 0:
            raise LayerMoEError(f"dpkg-deb -x failed on {deb.name}: {_tail(extract)}")
        log.info(f"downloaded and extracted {package} {version} ({log.human_bytes(deb.stat().st_size)})")
        return version


def _load_package(package: str, cache: Path, extract: Extractor) -> dict[str, Any]:
    """Parsed content of ``package`` (``{"package", "version", "help"|"ui"}``), from cache or fetched."""
    path = cache / "packages" / f"{package}.v{FORMAT_VERSION}.json"
    if path.exists():
        return json.loads(path.read_text("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{package}.") as tmp:
        root = Path(tmp) / "root"
        version = extract(package, root)
        content: dict[str, Any] = {"package": package, "version": version}
        if package.startswith("libreoffice-help-"):
            content["help"] = read_help_tree(root, package)
            count = f"{sum(map(len, content['help'].values()))} paragraphs on {len(content['help'])} pages"
        else:
            content["ui"] = read_ui_tree(root, package)
            count = f"{sum(map(len, content['ui'].values()))} strings in {len(content['ui'])} .mo files"
    atomic.write_text(path, json.dumps(content, ensure_ascii=False))
    log.info(f"parsed {package}: {count}")
    return content


# ------------------------------------------------------------------------------------------------ corpus


def _check_languages(languages: Sequence[str]) -> tuple[str, ...]:
    unknown = [lang for lang in languages if lang not in _LANGUAGES]
    if unknown or not languages:
        supported = ", ".join(f"{code} ({name})" for code, name in SUPPORTED_LANGUAGES.items())
        what = f"unknown language code(s) {', '.join(map(repr, unknown))}" if unknown else "no languages given"
        raise LayerMoEError(f"LibreOffice corpus: {what}; supported: {supported}")
    return tuple(dict.fromkeys(languages))


def _help_documents(pages: HelpPages, english: HelpPages | None) -> Iterable[dict[str, str]]:
    for page, paragraphs in pages.items():
        reference = {} if english is None else dict(english.get(page, ()))
        lines = [text for key, text in paragraphs if text != reference.get(key)]
        if lines:
            yield {"id": f"help:{page}", "text": "\n".join(lines)}


def _ui_documents(catalogs: UiCatalogs, english: bool) -> Iterable[dict[str, str]]:
    for mo, entries in catalogs.items():
        if english:
            texts = [clean_ui_string(english_of(key)) for key in entries]
        else:
            texts = [text for key, text in entries.items() if text != clean_ui_string(english_of(key))]
        lines = list(dict.fromkeys(text for text in texts if has_text(text)))
        for part, start in enumerate(range(0, len(lines), UI_LINES_PER_DOCUMENT)):
            yield {"id": f"ui:{mo}#{part}", "text": "\n".join(lines[start:start + UI_LINES_PER_DOCUMENT])}


def _parallel_entries(
    help_pages: Mapping[str, HelpPages], ui_catalogs: Mapping[str, UiCatalogs]
) -> Iterable[dict[str, str]]:
    """Entries with the English text and every translation that differs from it (at least one)."""
    help_lookup = {
        lang: {page: dict(pars) for page, pars in pages.items()} for lang, pages in help_pages.items() if lang != "en"
    }
    for page, paragraphs in help_pages["en"].items():
        for key, en_text in paragraphs:
            translations = {lang: pages.get(page, {}).get(key) for lang, pages in help_lookup.items()}
            yield from _entry(f"help:{page}#{key}", "help", en_text, translations)
    for mo in sorted({mo for catalogs in ui_catalogs.values() for mo in catalogs}):
        for key in sorted({key for catalogs in ui_catalogs.values() for key in catalogs.get(mo, {})}):
            translations = {lang: catalogs.get(mo, {}).get(key) for lang, catalogs in ui_catalogs.items()}
            yield from _entry(f"ui:{mo}:{key}", "ui", clean_ui_string(english_of(key)), translations)


def _entry(
    entry_id: str, source: str, en_text: str, translations: Mapping[str, str | None]
) -> Iterable[dict[str, str]]:
    """One parallel entry, or none if no translation is real text that differs from the English."""
    differing = {
        lang: text
        for lang, text in translations.items()
        if text is not None and text != en_text and has_text(text)
    }
    if differing and has_text(en_text):
        yield {"id": entry_id, "source": source, "en": en_text, **differing}


def _write_jsonl(path: Path, records: Iterable[dict[str, str]]) -> dict[str, int]:
    """Write records one per line; return ``{"documents", "characters", "bytes"}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = characters = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
            characters += len(record.get("text", ""))
    return {"documents": count, "characters": characters, "bytes": path.stat().st_size}


def _is_complete(root: Path) -> bool:
    manifest = root / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text("utf-8")).get("format") == BUILD_VERSION


def build_from_packages(languages: Sequence[str], cache_dir: Path, extract: Extractor) -> LibreOfficeCorpus:
    """Build (or reuse) the corpus, fetching missing packages with ``extract``; see ``build_libreoffice_corpus``."""
    langs = _check_languages(languages)
    cache = Path(cache_dir) / "libreoffice"
    corpus = LibreOfficeCorpus(cache / "-".join(sorted(langs)), langs)
    if _is_complete(corpus.root):
        log.info(f"LibreOffice corpus for {', '.join(langs)}: using the finished build at {corpus.root}")
        return corpus
    log.info(f"building LibreOffice corpus for {', '.join(langs)} in {corpus.root}")

    ordered = [lang for lang in _LANGUAGES if lang in langs]
    help_langs = ["en", *(lang for lang in ordered if lang != "en" and _LANGUAGES[lang].help_package)]
    ui_langs = [lang for lang in ordered if _LANGUAGES[lang].ui_package]
    packages: dict[str, str] = {}

    def load(package: str) -> dict[str, Any]:
        content = _load_package(package, cache, extract)
        packages[package] = content["version"]
        return content

    help_pages: dict[str, HelpPages] = {lang: load(_LANGUAGES[lang].help_package)["help"] for lang in help_langs}
    ui_catalogs: dict[str, UiCatalogs] = {lang: load(_LANGUAGES[lang].ui_package)["ui"] for lang in ui_langs}
    english_ui: UiCatalogs = load(ENGLISH_UI_REFERENCE)["ui"] if "en" in langs else {}

    with atomic.atomic_directory(corpus.root) as tmp:
        staged = LibreOfficeCorpus(tmp, langs)
        stats: dict[str, dict[str, int]] = {}
        for lang in langs:
            english = None if lang == "en" else help_pages["en"]
            docs = [
                *_help_documents(help_pages.get(lang, {}), english),
                *_ui_documents(english_ui if lang == "en" else ui_catalogs.get(lang, {}), english=lang == "en"),
            ]
            stats[lang] = _write_jsonl(staged.documents_path(lang), docs)
        parallel = list(_parallel_entries(help_pages, ui_catalogs))
        _write_jsonl(staged.parallel_path, parallel)
        for lang in langs:
            stats[lang]["parallel_entries"] = sum(lang in entry for entry in parallel)
        atomic.write_json(
            staged.manifest_path,
            {
                "format": BUILD_VERSION,
                "languages": list(langs),
                "packages": dict(sorted(packages.items())),
                "parallel_entries": len(parallel),
                "stats": stats,
            },
        )
    for lang, s in stats.items():
        log.info(
            f"  {lang}: {s['documents']} documents, {s['characters']:,} characters, "
            f"{log.human_bytes(s['bytes'])} on disk, in {s['parallel_entries']} parallel entries"
        )
    log.info(f"LibreOffice corpus done: {len(parallel)} parallel entries, at {corpus.root}")
    return corpus


def build_libreoffice_corpus(languages: Sequence[str], cache_dir: Path) -> LibreOfficeCorpus:
    """Download (apt) the LibreOffice help/l10n packages of ``languages`` and build the corpus, cached.

    English is always fetched: it is the reference that untranslated text is compared against and
    the pivot of every parallel entry.
    """
    return build_from_packages(languages, cache_dir, apt_extract)
