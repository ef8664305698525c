#!/usr/bin/env bash
# The test command: installs what the tests need, checks the code, then runs the whole suite.
# The test fixtures start the real PostgreSQL server, Kafka broker and S3 server themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/system-deps.sh
./deploy/setup.sh
if [ -x deploy/kafka/broker.sh ]; then ./deploy/kafka/broker.sh fetch; fi
if [ -x deploy/s3/server.sh ]; then ./deploy/s3/server.sh fetch; fi
# lint, formatting and strict typing (configured in pyproject.toml): a failure stops here
echo "ruff check, ruff format --check, mypy --strict ..."
.venv/bin/ruff check daemon patching memory tests
.venv/bin/ruff format --check daemon patching memory tests
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
