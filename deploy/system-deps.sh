#!/usr/bin/env bash
# Installs the system services the tests use, from Debian's packages, when missing:
# PostgreSQL (production database path), Java 17 + Maven (the real Kafka broker and the S3 server),
# systemd (systemd-analyze verify for the unit file), kcat (a producer no one here wrote: librdkafka,
# the client most non-Java services use, in the compression tests), openssl (the secured Kafka
# broker's certificates, deploy/kafka/broker.sh).
set -euo pipefail
need=()
command -v pg_ctlcluster >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v kcat >/dev/null 2>&1 || need+=(kcat)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing system packages: ${need[*]} (install them with apt-get as root)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
