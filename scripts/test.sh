#!/usr/bin/env bash
# Install everything (scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# If pytest dies by a signal (a native library's crash), say which test was running and show the
# Python stacks faulthandler wrote (tests/conftest.py), instead of a bare "Aborted".
trail="$(mktemp -t edge-retrieval-tests.XXXXXX)"
rc=0
EDGE_RETRIEVAL_TEST_TRAIL="$trail" .venv/bin/python -m pytest -q -ra "$@" || rc=$?
if [ "$rc" -gt 128 ]; then
    echo "pytest was killed by signal $((rc - 128)); the last test started and the stacks at the crash:" >&2
    grep '^running ' "$trail" | tail -n 1 >&2 || true
    grep -v '^running ' "$trail" | tail -n 120 >&2 || true
fi
rm -f "$trail"
exit "$rc"
