#!/usr/bin/env bash
# Install everything (scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# If pytest dies by a signal (a native library's crash), say which test was running (tests/conftest.py
# writes its id to the trail file); pytest's faulthandler has printed the Python stacks above.
trail="$(mktemp -t edge-retrieval-tests.XXXXXX)"
rc=0
EDGE_RETRIEVAL_TEST_TRAIL="$trail" .venv/bin/python -m pytest -q -ra "$@" || rc=$?
if [ "$rc" -gt 128 ]; then
    echo "pytest was killed by signal $((rc - 128)) while running: $(cat "$trail")" >&2
fi
rm -f "$trail"
exit "$rc"
