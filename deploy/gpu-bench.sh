#!/usr/bin/env bash
# The GPU measurement of patchd in one call (patching/eval/gpubench.py): fever-minilm in bfloat16 on
# real FEVER claims, and the published sizes of Llama-3.2-1B and Llama-3.1-8B with RANDOM weights;
# per-edit latency with the gate, the reference procedure and the speedup, peak GPU memory, and the
# inference overhead of 1,000 and 10,000 patch neurons. One JSON file.
#
#   deploy/gpu-bench.sh prepare        on a machine with the prepared base and ../shared/data:
#                                      writes gpu-carry/ (bfloat16 fever-minilm + claims, ~45 MiB,
#                                      git-ignored, small enough to travel to a GPU machine)
#   deploy/gpu-bench.sh run [FILE]     on the GPU machine (torch, transformers, safetensors and this
#                                      repository; nothing else): writes FILE (default
#                                      $OUT/gpu-bench.json when $OUT is set, else gpu-bench.json)
#
# With the session's device tool, after `prepare` here:
#   run(command="deploy/gpu-bench.sh run", carry=["gpu-carry"], timeout_s=560)
# then commit the JSON under docs/results/ (docs/results/README.md says how the CPU run was made).
# GPU_BENCH_ARGS adds options (python -m patching.eval.gpubench --help), e.g. a CPU trial:
#   GPU_BENCH_ARGS="--device cpu --configs llama-3.2-1b --edits 5 --memory-rows 2000" deploy/gpu-bench.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export OMP_WAIT_POLICY=PASSIVE PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
case "${1:-}" in
  prepare)
    exec "$PY" -m patching.eval.gpubench --prepare "${2:-gpu-carry}"
    ;;
  run)
    out=${2:-${OUT:+$OUT/}gpu-bench.json}
    carry=()
    if [ -d gpu-carry ]; then carry=(--carry gpu-carry); else echo "gpu-bench.sh: no gpu-carry/: the fever-minilm part is skipped" >&2; fi
    # shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of options
    exec timeout "${GPU_BENCH_TIMEOUT:-520}" "$PY" -m patching.eval.gpubench "${carry[@]}" --out "$out" ${GPU_BENCH_ARGS:-}
    ;;
  *)
    echo "usage: $0 prepare [DIR] | run [FILE]" >&2
    exit 2
    ;;
esac
