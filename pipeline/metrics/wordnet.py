"""WordNet for METEOR without the internet: find or build an NLTK data directory offline.

nltk's METEOR looks up synonyms in WordNet 3.0. Our machines cannot run ``nltk.download``, so the
data comes from Debian's ``wordnet-base`` package (``/usr/share/wordnet``), which holds every
file nltk reads except ``lexnames``; that 45-line list (WordNet 3.0's lexicographer files) ships
with this package as ``pipeline/metrics/data/wordnet-lexnames.tsv``. The files are *copied* (nltk
rejects symlinks that leave its root) into ``<data dir>/corpora/wordnet``.

Where the data directory is, in order:
1. ``$MEDPRUNER_NLTK_DATA`` if set (built there when missing);
2. the user cache ``$XDG_CACHE_HOME/medpruner/nltk_data`` (default ``~/.cache/...``);
3. any WordNet nltk already finds on ``nltk.data.path`` (e.g. from ``nltk.download``);
4. otherwise it is built into (2) from ``$WNSEARCHDIR`` or ``/usr/share/wordnet``.

Setup step: ``scripts/setup_wordnet.sh`` (installs ``wordnet-base`` and runs
``python -m pipeline.metrics.wordnet``). Loading WordNet costs ~4 s and ~140 MiB, so
:func:`load_wordnet` loads it once per process.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

WORDNET_FILES: tuple[str, ...] = (
    *(f"index.{pos}" for pos in ("adj", "adv", "noun", "verb")),
    *(f"data.{pos}" for pos in ("adj", "adv", "noun", "verb")),
    *(f"{pos}.exc" for pos in ("adj", "adv", "noun", "verb")),
    "cntlist.rev",
)
# Read by nltk only for sense-key lookups, which METEOR never does; copied when present.
OPTIONAL_FILES: tuple[str, ...] = ("index.sense",)
DEBIAN_WORDNET_DIR = "/usr/share/wordnet"
SETUP_HINT = (
    "install Debian's WordNet with `apt-get install -y wordnet-base` and run "
    "`scripts/setup_wordnet.sh` (or `python -m pipeline.metrics.wordnet`), or point "
    "$MEDPRUNER_NLTK_DATA at an NLTK data directory containing corpora/wordnet"
)

_lock = threading.Lock()


class WordNetMissingError(RuntimeError):
    """WordNet data for METEOR could not be found or built; the message names the setup step."""


def cache_data_dir() -> Path:
    """The NLTK data directory this package builds into (see the module docstring)."""
    env = os.environ.get("MEDPRUNER_NLTK_DATA")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medpruner" / "nltk_data"


def _is_complete(wordnet_dir: Path) -> bool:
    return all((wordnet_dir / name).is_file() for name in (*WORDNET_FILES, "lexnames"))


def _lexnames_text() -> str:
    return (resources.files("pipeline.metrics").joinpath("data/wordnet-lexnames.tsv")
            .read_text("utf-8"))


def build_wordnet(data_dir: Path, source_dir: Path | None = None) -> Path:
    """Build ``<data_dir>/corpora/wordnet`` from a Debian-layout WordNet 3.0 folder.

    Args:
        data_dir: the NLTK data directory to create or complete.
        source_dir: folder with ``index.noun`` etc.; default ``$WNSEARCHDIR`` or
            ``/usr/share/wordnet``.

    Returns:
        ``data_dir``.

    Raises:
        WordNetMissingError: if the source files are missing.
    """
    source = Path(source_dir or os.environ.get("WNSEARCHDIR") or DEBIAN_WORDNET_DIR)
    missing = [name for name in WORDNET_FILES if not (source / name).is_file()]
    if missing:
        raise WordNetMissingError(
            f"WordNet source folder {source} lacks {', '.join(missing)}; {SETUP_HINT}"
        )
    target = data_dir / "corpora" / "wordnet"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder and rename, so concurrent workers never see half a corpus.
    staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    try:
        for name in (*WORDNET_FILES, *OPTIONAL_FILES):
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        (staging / "lexnames").write_text(_lexnames_text(), encoding="utf-8")
        try:
            os.rename(staging, target)
        except OSError:
            if not _is_complete(target):  # someone else won the race only if it is complete
                shutil.rmtree(target, ignore_errors=True)
                os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return data_dir


def _nltk_finds_wordnet() -> bool:
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        return False
    return True


def ensure_wordnet() -> str:
    """Make WordNet available to nltk and return the NLTK data directory used.

    The directory is put first on ``nltk.data.path`` so ``nltk.corpus.wordnet`` finds it.

    Raises:
        WordNetMissingError: with the setup step to run, when no WordNet can be found or built.
    """
    import nltk

    with _lock:
        data_dir = cache_data_dir()
        if not _is_complete(data_dir / "corpora" / "wordnet"):
            if not os.environ.get("MEDPRUNER_NLTK_DATA") and _nltk_finds_wordnet():
                return str(Path(str(nltk.data.find("corpora/wordnet"))).parent.parent)
            build_wordnet(data_dir)
        if str(data_dir) not in nltk.data.path:
            nltk.data.path.insert(0, str(data_dir))
        return str(data_dir)


def _reader_class() -> type:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class WordNet30Reader(WordNetCorpusReader):
        """nltk's reader without the WordNet-3.0-to-loaded-version sense map.

        nltk builds that map (for multilingual OMW lookups only) from ``index.sense``, which
        Debian ships in a separate package. The loaded data *is* WordNet 3.0, so the map is the
        identity and METEOR never uses it: skipping it lets ``wordnet-base`` alone suffice.
        """

        def map_wn(self, version: str = "wordnet") -> None:
            return None

    return WordNet30Reader


@functools.cache
def load_wordnet() -> Any:
    """Return a loaded ``nltk`` WordNet reader, loading it once per process (~4 s)."""
    import nltk

    ensure_wordnet()
    root = nltk.data.find("corpora/wordnet")
    with warnings.catch_warnings():  # "multilingual functions are not available": expected
        warnings.simplefilter("ignore", UserWarning)
        reader = _reader_class()(root, None)
    reader.synsets("dog")  # force the lazy index load now, not inside the first score
    return reader


def main(argv: list[str] | None = None) -> int:
    """Command line: build (if needed) and print the NLTK data directory; exit 1 on failure."""
    del argv
    try:
        data_dir = ensure_wordnet()
        load_wordnet()
    except WordNetMissingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
