#!/usr/bin/env bash
# Fresh machine -> installed -> the default BirdNET bundle built -> real recordings streamed through the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/edge-retrieval demo "$@"
