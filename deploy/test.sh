#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite.
# The test fixtures start the real PostgreSQL server and Kafka broker themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/system-deps.sh
./deploy/setup.sh
if [ -x deploy/kafka/broker.sh ]; then ./deploy/kafka/broker.sh fetch; fi
exec .venv/bin/python -m pytest -q "$@"
