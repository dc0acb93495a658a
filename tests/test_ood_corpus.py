"""Out-of-domain evaluation text: the debian-reference builder on synthetic extracted packages (no apt), and the
per-run removal of paragraphs that also occur in the training text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from pipeline import ood_corpus
from pipeline.config import load_config
from pipeline.corpus import builtin_ood_languages, ood_documents, ood_source
from pipeline.errors import LayerMoEError

LONG_EN = "The package management system keeps track of every file that a package installs on the system."
SHARED = "This sentence is the same in every language because nobody has translated it yet, sadly."


def chapter(*paragraphs: str) -> str:
    """A page shaped like the manual's: a table of contents, then sections of paragraphs with inline markup."""
    return ('<html><body><div class="toc"><p><strong>Table of Contents</strong></p></div>'
            + "".join(f'<div class="section"><p>{p}</p></div>' for p in paragraphs) + "</body></html>")


PAGES = {
    "debian-reference-en": {"ch01.en.html": chapter(LONG_EN, "Run <code>apt-get   update</code> before you install "
                                                              "anything, and <em>read</em> the news.", SHARED, "Short."),
                            "ch02.en.html": chapter(LONG_EN, "12345 67890 12345 67890 12345 67890 12345 67890")},
    "debian-reference-es": {"ch01.es.html": chapter("El sistema de paquetes sabe qué archivos instala cada paquete "
                                                    "en el sistema.", SHARED)},
}


class FakeApt:
    """Stands in for ``apt_extract``: writes the package's pages under usr/share/debian-reference."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, package: str, dest: Path) -> str:
        self.calls.append(package)
        if package not in PAGES:
            raise LayerMoEError(f"cannot download Debian package {package}")
        root = dest / "usr/share/debian-reference"
        root.mkdir(parents=True)
        for name, html in PAGES[package].items():
            (root / name).write_text(html, encoding="utf-8")
        return "2.100"


def documents(corpus: ood_corpus.OodCorpus, lang: str) -> list[str]:
    return [json.loads(line)["text"] for line in corpus.documents_path(lang).read_text().splitlines()]


def test_paragraph_documents_without_untranslated_text(tmp_path):
    apt = FakeApt()
    corpus = ood_corpus.build_from_packages(["en", "es"], tmp_path, apt)
    assert documents(corpus, "en") == [LONG_EN, "Run apt-get update before you install anything, and read the news.",
                                       SHARED]  # whitespace collapsed, short/letterless paragraphs and repeats dropped
    assert documents(corpus, "es") == ["El sistema de paquetes sabe qué archivos instala cada paquete en el sistema."]
    manifest = json.loads(corpus.manifest_path.read_text())
    assert manifest["stats"]["en"]["documents"] == 3 and manifest["packages"]["debian-reference-es"] == "2.100"
    # a finished build is reused without fetching anything
    ood_corpus.build_from_packages(["en", "es"], tmp_path, apt)
    assert apt.calls == ["debian-reference-en", "debian-reference-es"]
    with pytest.raises(LayerMoEError, match=r"no manual for \['el'\]"):
        ood_corpus.build_from_packages(["el"], tmp_path, apt)
    with pytest.raises(LayerMoEError, match="cannot download Debian package debian-reference-fr"):
        ood_corpus.build_from_packages(["fr"], tmp_path / "other", apt)
    assert not (tmp_path / "other" / "debian-reference" / "fr").exists()


def test_ood_documents_drop_what_the_training_text_contains(tmp_path):
    training = ["First training paragraph.\nIt has a second line.", "Another training document."]
    write_jsonl(tmp_path / "en.jsonl", training * 20)
    write_jsonl(tmp_path / "el.jsonl", ["Ελληνικό κείμενο."] * 20)
    write_jsonl(tmp_path / "en_ood.jsonl", ["An out-of-domain paragraph.", "It has a second line.",
                                            "Another   training document.", "Mixed: new text.\nIt has a second line."])
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"""
name: t
old_languages: [en]
rounds: [{{name: g1, languages: [el]}}]
allocate: {{method: uniform, experts_per_layer: 2}}
data:
  builtin_corpus: none
  heldout_fraction: 0.01
  sources: {{en: {{path: {tmp_path}/en.jsonl}}, el: {{path: {tmp_path}/el.jsonl}}}}
  ood_sources: {{en: {{path: {tmp_path}/en_ood.jsonl}}}}
""")
    config = load_config(config_file)
    kept, removed = ood_documents(config, "en")
    assert kept == ["An out-of-domain paragraph.", "Mixed: new text.\nIt has a second line."] and removed == 2
    assert ood_source(config, "el") is None  # no out-of-domain text: not scored out of domain
    with pytest.raises(LayerMoEError, match="'el' has no out-of-domain text"):
        ood_documents(config, "el")
    # the built-in manual covers the old languages it has, when the built-in corpus is on (or asked for)
    assert builtin_ood_languages(config) == []
    assert builtin_ood_languages(load_config(config_file, ["data.builtin_ood=debian-reference"])) == []  # en configured
    assert builtin_ood_languages(load_config(config_file, ["data.builtin_ood=debian-reference",
                                                           "data.ood_sources={}"])) == ["en"]
    with pytest.raises(LayerMoEError, match=r"data\.ood_sources\.en\.path: corpus .* does not exist"):
        ood_source(load_config(config_file, [f"data.ood_sources.en.path={tmp_path}/missing.jsonl"]), "en")


@pytest.mark.slow
def test_real_packages(tmp_path):
    """The real debian-reference packages still parse (downloads about 5 MB)."""
    corpus = ood_corpus.build_debian_reference_corpus(["en", "es", "zh"], tmp_path)
    stats = json.loads(corpus.manifest_path.read_text())["stats"]
    assert stats["en"]["documents"] > 1500 and stats["es"]["documents"] > 200 and stats["zh"]["documents"] > 200
