"""LibreOffice corpus builder on synthetic extracted packages (no apt, no network)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from pipeline import libreoffice_corpus as lc
from pipeline.errors import LayerMoEError


def mo_bytes(entries: dict[str, str]) -> bytes:
    """A valid little-endian GNU .mo file holding ``entries`` (msgid -> msgstr) and a UTF-8 header."""
    entries = {"": "Content-Type: text/plain; charset=UTF-8\n", **entries}
    keys = sorted(entries)
    ids = [k.encode() for k in keys]
    strs = [entries[k].encode() for k in keys]
    n = len(keys)
    data_start = 28 + 16 * n
    offsets, blob = [], b""
    for s in ids + strs:
        offsets.append((len(s), data_start + len(blob)))
        blob += s + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    return header + b"".join(struct.pack("<2I", *o) for o in offsets) + blob


def page(*paragraphs: str) -> str:
    """A help page shaped like the real ones: header/index chrome, DisplayArea, debug footer."""
    return (
        '<!DOCTYPE html><html lang="x"><head><meta charset="utf-8"><title>T</title></head><body>'
        '<header id="TopLeftHeader"><p dir="auto">LibreOffice 7.4 Help</p></header>'
        f'<div id="DisplayArea">{"".join(paragraphs)}</div>'
        '<footer><div id="DEBUG"><p id="bm_module" dir="auto"></p><p dir="auto">Title is: T</p></div></footer>'
        "</body></html>"
    )


def keys(mac: str, default: str) -> str:
    return (
        '<span id="swlnsys_1" class="switchinline"><span hidden="true" id="MAC_1" class="MAC">'
        f'<span class="keycode">{mac}</span></span><span hidden="true" id="default_1">'
        f'<span class="keycode">{default}</span></span></span>'
    )


HELP = {
    "libreoffice-help-en-us": ("en-US", {
        "text/swriter/a.html": page(
            '<h1 id="hd_id1">Page Numbers</h1>',
            f'<p id="par_id2" class="paragraph">Press {keys("Command+T", "F11")} to open styles.</p>',
            '<p id="par_id3">Click <span class="emph">OK</span>.</p>',
            '<div class="embedded"><p id="par_id3">Embedded copy.</p></div>',
            '<p id="par_id4">12</p>',
        ),
        "text/scalc/b.html": page('<h2 id="hd_id5">Only English</h2>'),
    }),
    "libreoffice-help-es": ("es", {
        "text/swriter/a.html": page(
            '<h1 id="hd_id1">Números de página</h1>',
            f'<p id="par_id2" class="paragraph">Pulse {keys("Comando+T", "F11")} para abrir estilos.</p>',
            '<p id="par_id3">Click <span class="emph">OK</span>.</p>',
            '<div class="embedded"><p id="par_id3">Copia incrustada.</p></div>',
            '<p id="par_id4">12</p>',
        ),
        "text/scalc/b.html": page('<h2 id="hd_id5">Only English</h2>'),
    }),
}

UI = {
    "libreoffice-l10n-es": ("es", {
        "sw.mo": {"ctx|a\x04_Open": "_Abrir",
                  "ctx|b\x04Save": "Guardar", "ctx|c\x04OK": "OK", "STR_X\x04~Close": "~Cerrar"},
        "sc.mo": {"STR_Y\x04Sheet": "Hoja"},
    }),
    "libreoffice-l10n-bn": ("bn", {
        "sw.mo": {"ctx|a\x04_Open": "খুলুন (_O)", "ctx|c\x04OK": "ঠিক আছে", "ctx|d\x04Print": "মুদ্রণ"},
    }),
}


class FakeApt:
    """An ``Extractor`` that writes the synthetic package trees and records what it was asked for."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, package: str, dest: Path) -> str:
        self.calls.append(package)
        if package in HELP:
            locale, pages = HELP[package]
            for rel, html in pages.items():
                path = dest / "usr/share/libreoffice/help" / locale / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(html, "utf-8")
            (dest / "usr/share/libreoffice/help/media/helpimg").mkdir(parents=True)
        else:
            code, catalogs = UI[package]
            messages = dest / "usr/lib/libreoffice/program/resource" / code / "LC_MESSAGES"
            messages.mkdir(parents=True)
            for name, entries in catalogs.items():
                (messages / name).write_bytes(mo_bytes(entries))
        return "1:7.4-test"


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


@pytest.fixture
def built(tmp_path: Path) -> tuple[lc.LibreOfficeCorpus, FakeApt]:
    apt = FakeApt()
    return lc.build_from_packages(["en", "es", "bn"], tmp_path, apt), apt


def test_parse_help_page_keys_ids_and_keeps_default_keys() -> None:
    en_pages = HELP["libreoffice-help-en-us"][1]
    assert lc.parse_help_page(en_pages["text/swriter/a.html"]) == [
        ("hd_id1", "Page Numbers"),
        ("par_id2", "Press F11 to open styles."),
        ("par_id3", "Click OK."),
        ("par_id3#2", "Embedded copy."),
        ("par_id4", "12"),
    ]


def test_read_mo_and_clean_ui_string() -> None:
    data = mo_bytes({"ctx\x04Save": "Guardar", "ctx\x04$1 row\x00$1 rows": "$1 fila\x00$1 filas"})
    assert lc.read_mo(data) == {"ctx\x04Save": "Guardar", "ctx\x04$1 row": "$1 fila"}
    assert lc.clean_ui_string("~Cerrar") == "Cerrar"
    assert lc.clean_ui_string("Categor_y") == "Category"
    assert lc.clean_ui_string("保存(_S)") == "保存"
    assert lc.clean_ui_string("%FILE_NAME saved") == "%FILE_NAME saved"
    assert lc.clean_ui_string("ROW_NUMBER") == "ROW_NUMBER"


def test_documents(built: tuple[lc.LibreOfficeCorpus, FakeApt]) -> None:
    corpus, _ = built
    assert corpus.languages == ("en", "es", "bn")
    docs = {lang: {d["id"]: d["text"] for d in read_jsonl(corpus.documents_path(lang))} for lang in corpus.languages}
    assert docs["en"] == {
        "help:text/scalc/b.html": "Only English",
        "help:text/swriter/a.html": "Page Numbers\nPress F11 to open styles.\nClick OK.\nEmbedded copy.",
        "ui:sc.mo#0": "Sheet",
        "ui:sw.mo#0": "Close\nOpen\nSave\nOK",
    }
    # untranslated (identical to English) help paragraphs and UI strings are dropped; so are pages left empty
    assert docs["es"] == {
        "help:text/swriter/a.html": "Números de página\nPulse F11 para abrir estilos.\nCopia incrustada.",
        "ui:sc.mo#0": "Hoja",
        "ui:sw.mo#0": "Cerrar\nAbrir\nGuardar",
    }
    assert docs["bn"] == {"ui:sw.mo#0": "খুলুন\nঠিক আছে\nমুদ্রণ"}


def test_parallel_alignment(built: tuple[lc.LibreOfficeCorpus, FakeApt]) -> None:
    corpus, _ = built
    assert read_jsonl(corpus.parallel_path) == [
        {"id": "help:text/swriter/a.html#hd_id1", "source": "help", "en": "Page Numbers", "es": "Números de página"},
        {"id": "help:text/swriter/a.html#par_id2", "source": "help", "en": "Press F11 to open styles.",
         "es": "Pulse F11 para abrir estilos."},
        {"id": "help:text/swriter/a.html#par_id3#2", "source": "help", "en": "Embedded copy.",
         "es": "Copia incrustada."},
        {"id": "ui:sc.mo:STR_Y\x04Sheet", "source": "ui", "en": "Sheet", "es": "Hoja"},
        {"id": "ui:sw.mo:STR_X\x04~Close", "source": "ui", "en": "Close", "es": "Cerrar"},
        {"id": "ui:sw.mo:ctx|a\x04_Open", "source": "ui", "en": "Open", "es": "Abrir", "bn": "খুলুন"},
        {"id": "ui:sw.mo:ctx|b\x04Save", "source": "ui", "en": "Save", "es": "Guardar"},
        {"id": "ui:sw.mo:ctx|c\x04OK", "source": "ui", "en": "OK", "bn": "ঠিক আছে"},
        {"id": "ui:sw.mo:ctx|d\x04Print", "source": "ui", "en": "Print", "bn": "মুদ্রণ"},
    ]
    manifest = json.loads(corpus.manifest_path.read_text())
    assert manifest["parallel_entries"] == 9
    assert {lang: s["parallel_entries"] for lang, s in manifest["stats"].items()} == {"en": 9, "es": 7, "bn": 3}
    assert manifest["packages"] == dict.fromkeys(
        ["libreoffice-help-en-us", "libreoffice-help-es", "libreoffice-l10n-bn", "libreoffice-l10n-es"], "1:7.4-test"
    )


def test_cached_builds_do_no_work(built: tuple[lc.LibreOfficeCorpus, FakeApt], tmp_path: Path) -> None:
    corpus, apt = built
    assert sorted(apt.calls) == ["libreoffice-help-en-us", "libreoffice-help-es", "libreoffice-l10n-bn",
                                 "libreoffice-l10n-es"]
    before = {p: p.stat().st_mtime_ns for p in corpus.root.rglob("*")}
    again = lc.build_from_packages(["bn", "es", "en"], tmp_path, apt)
    assert again.root == corpus.root and again.languages == ("bn", "es", "en")
    assert {p: p.stat().st_mtime_ns for p in corpus.root.rglob("*")} == before
    subset = lc.build_from_packages(["en", "bn"], tmp_path, apt)  # a new build, from the package cache
    assert len(apt.calls) == 4
    assert subset.root.name == "bn-en" and read_jsonl(subset.documents_path("bn"))


def test_build_is_deterministic(built: tuple[lc.LibreOfficeCorpus, FakeApt], tmp_path: Path) -> None:
    corpus, _ = built
    other = lc.build_from_packages(["en", "es", "bn"], tmp_path / "other", FakeApt())
    for rel in ["docs/en.jsonl", "docs/es.jsonl", "docs/bn.jsonl", "parallel.jsonl", "manifest.json"]:
        assert (other.root / rel).read_bytes() == (corpus.root / rel).read_bytes()


def test_failure_mid_build_leaves_nothing_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(lc, "_parallel_entries", broken)  # documents are written by then
    with pytest.raises(RuntimeError, match="disk full"):
        lc.build_from_packages(["en", "es"], tmp_path, FakeApt())
    assert not (tmp_path / "libreoffice/en-es").exists()
    assert not list((tmp_path / "libreoffice").rglob("manifest.json"))
    monkeypatch.undo()
    apt = FakeApt()
    corpus = lc.build_from_packages(["en", "es"], tmp_path, apt)
    assert apt.calls == [] and corpus.manifest_path.exists()  # packages were cached before the failure


def test_failed_package_is_not_cached(tmp_path: Path) -> None:
    def failing(package: str, dest: Path) -> str:
        dest.mkdir(parents=True)
        raise LayerMoEError(f"cannot download {package}")

    with pytest.raises(LayerMoEError, match="libreoffice-help-en-us"):
        lc.build_from_packages(["en"], tmp_path, failing)
    assert [p.name for p in (tmp_path / "libreoffice").iterdir()] == ["packages"]
    assert list((tmp_path / "libreoffice/packages").iterdir()) == []


def test_unknown_language(tmp_path: Path) -> None:
    with pytest.raises(LayerMoEError, match=r"'xx'.*en \(English\).*ne \(Nepali\)"):
        lc.build_from_packages(["en", "xx"], tmp_path, FakeApt())
    with pytest.raises(LayerMoEError, match="no languages"):
        lc.build_from_packages([], tmp_path, FakeApt())


def test_apt_extract_without_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LayerMoEError, match="apt-get.*libreoffice-l10n-bn"):
        lc.apt_extract("libreoffice-l10n-bn", tmp_path / "root")


def test_apt_extract_updates_once_then_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir, log_file = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(
        f'#!/bin/sh\necho "$@" >> {log_file}\n'
        '[ "$1" = update ] && exit 0\necho "E: Unable to locate package $2" >&2\nexit 100\n'
    )
    (bin_dir / "dpkg-deb").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(LayerMoEError, match="libreoffice-l10n-ne: E: Unable to locate package"):
        lc.apt_extract("libreoffice-l10n-ne", tmp_path / "root")
    assert log_file.read_text().splitlines() == [
        "download libreoffice-l10n-ne", "update", "download libreoffice-l10n-ne"
    ]


@pytest.mark.slow
def test_real_packages(tmp_path: Path) -> None:
    """The real Debian layout still matches what the parser expects (downloads about 3 MB)."""
    corpus = lc.build_libreoffice_corpus(["en", "bn"], tmp_path)
    manifest = json.loads(corpus.manifest_path.read_text())
    assert manifest["stats"]["en"]["documents"] > 2000
    assert manifest["stats"]["bn"]["characters"] > 100_000
    assert manifest["parallel_entries"] > 5000
