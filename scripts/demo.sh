#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the demo evaluation: local Ray, local files, the
# embedded small model and the built-in synthetic dataset. Extra arguments are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/medpruner demo "$@"
