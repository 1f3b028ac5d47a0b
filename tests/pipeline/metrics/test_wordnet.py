"""WordNet offline: built from Debian's files plus the packaged lexnames, clear failure
otherwise."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from pipeline.metrics import wordnet


def test_packaged_lexnames_is_wordnet_30_list():
    lines = (resources.files("pipeline.metrics").joinpath("data/wordnet-lexnames.tsv")
             .read_text().splitlines())
    assert len(lines) == 45
    assert ([line.split("\t")[:2] for line in (lines[0], lines[44])]
            == [["00", "adj.all"], ["44", "adj.ppl"]])


@pytest.mark.skipif(not Path(wordnet.DEBIAN_WORDNET_DIR, "index.noun").exists(),
                    reason="Debian wordnet-base not installed (scripts/setup_wordnet.sh)")
def test_build_from_debian_into_env_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPRUNER_NLTK_DATA", str(tmp_path / "nltk"))
    import nltk

    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    assert wordnet.ensure_wordnet() == str(tmp_path / "nltk")
    corpus = tmp_path / "nltk" / "corpora" / "wordnet"
    for name in (*wordnet.WORDNET_FILES, "lexnames"):
        assert (corpus / name).is_file() and not (corpus / name).is_symlink()
    assert nltk.data.path[0] == str(tmp_path / "nltk")
    assert wordnet.ensure_wordnet() == str(tmp_path / "nltk")  # second call: already built


def test_missing_source_names_the_setup_step(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPRUNER_NLTK_DATA", str(tmp_path / "nltk"))
    monkeypatch.setenv("WNSEARCHDIR", str(tmp_path / "no-wordnet-here"))
    with pytest.raises(wordnet.WordNetMissingError, match="apt-get install -y wordnet-base") as err:
        wordnet.ensure_wordnet()
    assert "scripts/setup_wordnet.sh" in str(err.value)


def test_reader_finds_synonyms():
    reader = wordnet.load_wordnet()  # cached: loaded once per process
    assert reader is wordnet.load_wordnet()
    assert "car" in {lemma.name() for s in reader.synsets("automobile") for lemma in s.lemmas()}
