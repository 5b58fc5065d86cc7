#!/usr/bin/env bash
# Fresh machine -> installed -> the default bundle (BirdNET + YAMNet) built -> real recordings streamed through the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/edge-retrieval demo "$@"
