#!/usr/bin/env bash
# The first command of the README: install patchd, prepare the fever-minilm base (cached after
# the first run) and run the main job on embedded defaults: 50 real mistakes of the base fixed
# one after another, cached trainer and reference procedure side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh
.venv/bin/patchd prepare fever-minilm
mkdir -p out
.venv/bin/patchd bench edit --base fever-minilm --edits 50 --json out/bench-edit-fever-minilm.json "$@"
