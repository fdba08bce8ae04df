#!/usr/bin/env bash
# Sets up (or refreshes) the project's virtual environment in .venv.
# Idempotent: a second run with unchanged pins only checks a stamp and returns.
#
# Why the order below: deepspeed ships only as a source distribution whose setup
# imports torch. Built in pip's isolated build environment it would pull its own,
# unpinned torch (a multi-GB CUDA build), so torch is installed first from the pin
# and deepspeed is built against it with --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.setup-stamp
want=$(cat requirements.lock pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "setup.sh: $PYTHON not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c requirements.lock)

"${pip[@]}" setuptools wheel
"${pip[@]}" torch
"${pip[@]}" -r <(grep -vE '^(deepspeed|torch)==' requirements.lock)
"${pip[@]}" --no-build-isolation deepspeed
"${pip[@]}" --no-build-isolation --no-deps -e ".[dev]"

echo "$want" > "$STAMP"
echo "setup.sh: environment ready in $VENV"
