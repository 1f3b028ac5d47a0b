#!/usr/bin/env bash
# Offline WordNet for METEOR: install Debian's wordnet-base when missing (needs root and
# apt-get), then build the NLTK data directory (pipeline/wordnet.py says where; default
# ~/.cache/medpruner/nltk_data, or $MEDPRUNER_NLTK_DATA). Safe to run again: it only fills gaps.
# Usage: scripts/setup_wordnet.sh   (PYTHON=/path/to/python to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
source_dir="${WNSEARCHDIR:-/usr/share/wordnet}"
if [ ! -f "$source_dir/index.noun" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's wordnet-base (WordNet 3.0) ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null
  else
    echo "error: WordNet 3.0 not found in $source_dir; as root run: apt-get install -y wordnet-base" >&2
    exit 1
  fi
fi
exec "$PYTHON" -m pipeline.metrics.wordnet
