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

LIB="$S3_CACHE_DIR/lib"
PID_FILE="$S3_STATE_DIR/server.pid"
LOG_FILE="$S3_STATE_DIR/server.log"
CONF="$S3_STATE_DIR/s3proxy.conf"
SECRET_FILE="$S3_STATE_DIR/secret-key"
DATA="$S3_STATE_DIR/data"
ENDPOINT="http://127.0.0.1:$S3_PORT"
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java

die() { echo "server.sh: $*" >&2; exit 1; }

need_java() {
  command -v "$JAVA" >/dev/null 2>&1 || die "java not found (s3proxy $S3PROXY_VERSION needs Java 17+); run deploy/system-deps.sh"
  local major
  major=$("$JAVA" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p')
  [ -n "$major" ] && [ "$major" -ge 17 ] || die "s3proxy $S3PROXY_VERSION needs Java 17+, $JAVA is ${major:-unknown}"
}

fetch() {
  [ -f "$LIB/.complete" ] && return 0
  command -v mvn >/dev/null 2>&1 || die "mvn not found (needed once to fetch the s3proxy jars); run deploy/system-deps.sh"
  mkdir -p "$(dirname "$S3_CACHE_DIR")"
  # concurrent fetches are serialised and the jars published with one rename (as broker.sh does)
  (
    command -v flock >/dev/null 2>&1 && flock 9
    [ -f "$LIB/.complete" ] && exit 0
    work=$(mktemp -d "$S3_CACHE_DIR.tmp.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    cp "$HERE/pom.xml" "$work/pom.xml"
    echo "server.sh: fetching s3proxy $S3PROXY_VERSION jars from Maven Central into $LIB" >&2
    (cd "$work" && mvn -q -B -Dstyle.color=never dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$work/lib" -Ds3proxy.version="$S3PROXY_VERSION" >&2) \
      || die "mvn could not fetch org.gaul:s3proxy:$S3PROXY_VERSION (see the output above)"
    ls "$work/lib"/s3proxy-*.jar >/dev/null 2>&1 || die "the fetch produced no s3proxy jar"
    touch "$work/lib/.complete"
    mkdir -p "$S3_CACHE_DIR"
    rm -rf "$LIB"
    mv "$work/lib" "$LIB"
  ) 9>"$S3_CACHE_DIR.lock"
}

secret_key() {
  if [ -n "${S3_SECRET_KEY:-}" ]; then echo "$S3_SECRET_KEY"; return; fi
  if [ ! -s "$SECRET_FILE" ]; then
    mkdir -p "$S3_STATE_DIR"
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(30))' >"$SECRET_FILE")
  fi
  cat "$SECRET_FILE"
}

# The pid in the pid file, if that process is alive and is this state dir's server (pids get reused).
server_pid() {
  [ -f "$PID_FILE" ] || return 1
  local pid args
  pid=$(cat "$PID_FILE")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  if [ -r "/proc/$pid/cmdline" ]; then args=$(tr '\0' ' ' <"/proc/$pid/cmdline"); else args=$(ps -o args= -p "$pid" || true); fi
  case "$args" in *org.gaul.s3proxy.Main*"$CONF"*) echo "$pid" ;; *) return 1 ;; esac
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
  if pid=$(server_pid); then
    wait_ready "$pid"
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
  wait_ready "$pid"
  print_env
}

wait_ready() {
  local pid=$1 deadline=$((SECONDS + S3_START_TIMEOUT))
  until answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PID_FILE"
      tail -n 40 "$LOG_FILE" >&2
      die "the server exited during start-up (log: $LOG_FILE)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 40 "$LOG_FILE" >&2
      stop >&2 || true
      die "the server did not answer on $ENDPOINT within ${S3_START_TIMEOUT}s (log: $LOG_FILE)"
    fi
    sleep 0.2
  done
}

stop() {
  local pid deadline
  if ! pid=$(server_pid); then
    rm -f "$PID_FILE"
    echo "stopped"
    return 0
  fi
  kill -TERM "$pid"
  deadline=$((SECONDS + S3_STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      kill -KILL "$pid" 2>/dev/null || true
      rm -f "$PID_FILE"
      die "the server (pid $pid) ignored SIGTERM for ${S3_STOP_TIMEOUT}s and was killed (log: $LOG_FILE)"
    fi
    sleep 0.1
  done
  rm -f "$PID_FILE"
  echo "stopped"
}

status() {
  local pid
  if ! pid=$(server_pid); then
    echo "stopped"
    return 3
  fi
  if answers; then
    echo "running pid=$pid endpoint=$ENDPOINT state=$S3_STATE_DIR"
    return 0
  fi
  echo "not answering pid=$pid endpoint=$ENDPOINT state=$S3_STATE_DIR (log: $LOG_FILE)"
  return 1
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) print_env ;;
  *) echo "usage: $0 fetch|start|stop|status|env" >&2; exit 2 ;;
esac
