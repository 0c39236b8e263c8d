#!/usr/bin/env bash
# Runs tests/python/test_openai_client.py against BASE_URL (e.g. http://127.0.0.1:8080/v1) in a venv
# with the `openai` package, creating the venv on first use.
#   OPENAI_VENV   where the venv lives (default: <cargo target dir>/openai-venv, outside version control)
# Exit codes: 0 passed, 1 failed, 77 the venv could not be created (no python3-venv or no package index).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../../.." && pwd)"  # the workspace root (crates/gateway/tests/python)
venv="${OPENAI_VENV:-${CARGO_TARGET_DIR:-$repo/target}/openai-venv}"
if ! "$venv/bin/python" -c 'import openai' >/dev/null 2>&1; then
    echo "creating $venv with the openai package" >&2
    python3 -m venv "$venv" >&2 || exit 77
    "$venv/bin/python" -m pip install -q --disable-pip-version-check 'openai>=1.40,<3' >&2 || exit 77
fi
exec "$venv/bin/python" "$here/test_openai_client.py" "$1"
