#!/usr/bin/env bash
# A real S3-compatible server for development and tests: s3proxy (the S3 REST API with AWS v2/v4
# signatures, on Jetty) over a local directory, on 127.0.0.1, jars from Maven Central, no Docker.
#
#   deploy/s3/server.sh fetch    put s3proxy's jars into the cache (needs mvn; nothing else)
#   deploy/s3/server.sh start    fetch, start, create the buckets; prints the endpoint URL, then the
#                                environment lines of its credentials, and returns once a signed
#                                request is answered (idempotent)
#   deploy/s3/server.sh stop     SIGTERM, wait for the JVM to exit (KILL only after a timeout)
#   deploy/s3/server.sh status   exit 0 running and answering, 1 running but not answering, 3 stopped
#   deploy/s3/server.sh env      print the endpoint and credential lines again (no start)
#
# Environment (each default with its reason):
#   S3_PORT            9000: the port S3-compatible servers (MinIO, SeaweedFS's gateway) use by habit
#   S3_STATE_DIR       ~/.local/state/patchd/s3-<port>: one server per port; objects kept across restarts
#   S3_CACHE_DIR       ~/.cache/patchd/s3proxy-<version>: jars shared by every server of a version
#   S3_BUCKETS         patchd: buckets created at start (space-separated); others via the S3 API
#   S3_ACCESS_KEY      patchd: the one identity this server accepts
#   S3_SECRET_KEY      random, made at first start and kept in the state dir (mode 0600)
#   S3_HEAP_OPTS       -Xmx256m: a test server holds no object in memory
#   S3_JVM_OPTS        C1 only + serial GC: half the start-up on 2 busy cores (as the Kafka script)
#   S3_START_TIMEOUT   60 s: a cold JVM answers in ~2 s on an idle 2-core machine
#   S3_STOP_TIMEOUT    30 s: Jetty stops in well under a second
# See README.md beside this file for why s3proxy.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
S3PROXY_VERSION=${S3PROXY_VERSION:-2.6.0}
S3_PORT=${S3_PORT:-9000}
S3_STATE_DIR=${S3_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/patchd/s3-$S3_PORT}
S3_CACHE_DIR=${S3_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/patchd/s3proxy-$S3PROXY_VERSION}
S3_BUCKETS=${S3_BUCKETS:-patchd}
S3_ACCESS_KEY=${S3_ACCESS_KEY:-patchd}
S3_HEAP_OPTS=${S3_HEAP_OPTS:--Xmx256m -Xms32m}
S3_JVM_OPTS=${S3_JVM_OPTS:--XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Djava.awt.headless=true}
S3_START_TIMEOUT=${S3_START_TIMEOUT:-60}
S3_STOP_TIMEOUT=${S3_STOP_TIMEOUT:-30}

PID_FILE="$S3_STATE_DIR/server.pid"
LOG_FILE="$S3_STATE_DIR/server.log"
CONF="$S3_STATE_DIR/s3proxy.conf"
SECRET_FILE="$S3_STATE_DIR/secret-key"
DATA="$S3_STATE_DIR/data"
ENDPOINT="http://127.0.0.1:$S3_PORT"

SERVICE=server.sh
PRODUCT="s3proxy $S3PROXY_VERSION"
CACHE_DIR=$S3_CACHE_DIR
PROCESS_MATCH="*org.gaul.s3proxy.Main*$CONF*"
START_TIMEOUT=$S3_START_TIMEOUT
STOP_TIMEOUT=$S3_STOP_TIMEOUT
# die, need_java, fetch_jars, service_pid, wait_ready, stop_service, service_status
# shellcheck source=../lib/jvm-service.sh
. "$HERE/../lib/jvm-service.sh"

fetch() {
  fetch_jars "$HERE/pom.xml" "s3proxy-*.jar" -Ds3proxy.version="$S3PROXY_VERSION"
}

secret_key() {
  if [ -n "${S3_SECRET_KEY:-}" ]; then echo "$S3_SECRET_KEY"; return; fi
  if [ ! -s "$SECRET_FILE" ]; then
    mkdir -p "$S3_STATE_DIR"
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(30))' >"$SECRET_FILE")
  fi
  cat "$SECRET_FILE"
}

# Does an S3 server answer a signed ListBuckets with 200 for our credentials? An open port alone
# is not enough (Jetty accepts before the handler is ready), and a 403 means another server.
answers() {
  python3 - "$ENDPOINT" "$S3_ACCESS_KEY" "$(secret_key)" <<'PY' 2>/dev/null
import base64, hmac, sys, urllib.request
from email.utils import formatdate
endpoint, key, secret = sys.argv[1:4]
date = formatdate(usegmt=True)
# AWS signature version 2 (the server takes v2 and v4): HMAC-SHA1 of "GET\n\n\n<date>\n/"
signature = base64.b64encode(hmac.new(secret.encode(), f"GET\n\n\n{date}\n/".encode(), "sha1").digest()).decode()
request = urllib.request.Request(endpoint + "/", headers={"Date": date, "Authorization": f"AWS {key}:{signature}"})
try:
    with urllib.request.urlopen(request, timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

write_conf() {
  mkdir -p "$S3_STATE_DIR" "$DATA"
  local secret
  secret=$(secret_key)
  (umask 077 && cat >"$CONF" <<EOF
# Written by deploy/s3/server.sh on every start; edit the script, not this file.
s3proxy.endpoint=$ENDPOINT
s3proxy.authorization=aws-v2-or-v4
s3proxy.identity=$S3_ACCESS_KEY
s3proxy.credential=$secret
jclouds.provider=filesystem-nio2
# the blob store's own login (a directory has none, but the provider requires the keys)
jclouds.identity=local
jclouds.credential=local
jclouds.filesystem.basedir=$DATA
EOF
  )
  # a bucket of the filesystem store is a directory under basedir
  local bucket
  for bucket in $S3_BUCKETS; do mkdir -p "$DATA/$bucket"; done
}

print_env() {
  echo "$ENDPOINT"
  echo "AWS_ENDPOINT_URL_S3=$ENDPOINT"
  echo "AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY"
  echo "AWS_SECRET_ACCESS_KEY=$(secret_key)"
  echo "AWS_REGION=us-east-1"
}

start() {
  local pid
  if pid=$(service_pid); then
    wait_ready "$pid" "$ENDPOINT"
    print_env
    return 0
  fi
  rm -f "$PID_FILE"
  if (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null; then
    die "port $S3_PORT is already in use by a server that was not started from $S3_STATE_DIR"
  fi
  need_java
  fetch
  write_conf
  # nohup + </dev/null + log redirection: the server outlives this script and holds no pipe of the caller's
  # shellcheck disable=SC2086  # both *_OPTS are lists of JVM flags
  nohup "$JAVA" $S3_HEAP_OPTS $S3_JVM_OPTS -Dlogback.configurationFile="$HERE/logback.xml" -cp "$LIB/*" \
    org.gaul.s3proxy.Main --properties "$CONF" </dev/null >>"$LOG_FILE" 2>&1 &
  pid=$!
  echo "$pid" >"$PID_FILE"
  wait_ready "$pid" "$ENDPOINT"
  print_env
}

status() {
  service_status "endpoint=$ENDPOINT state=$S3_STATE_DIR"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop_service ;;
  status) status ;;
  env) print_env ;;
  *) echo "usage: $0 fetch|start|stop|status|env" >&2; exit 2 ;;
esac
