#!/usr/bin/env bash
# A real Apache Kafka broker for development and tests: KRaft combined mode (broker + controller
# in one JVM, a single static voter) on 127.0.0.1, jars from Maven Central, no Docker, no tarball.
#
#   deploy/kafka/broker.sh fetch    put the broker's jars into the cache (needs mvn; nothing else)
#   deploy/kafka/broker.sh start    fetch, format storage once, start; prints the bootstrap address
#                                   and returns once the broker answers (idempotent)
#   deploy/kafka/broker.sh stop     SIGTERM, wait for a clean shutdown (KILL only after a timeout)
#   deploy/kafka/broker.sh status   exit 0 running and answering, 1 running but not answering, 3 stopped
#
# Environment (each default with its reason):
#   KAFKA_PORT             9092: the port every Kafka client tries first
#   KAFKA_CONTROLLER_PORT  KAFKA_PORT+1: the conventional controller port next to the broker's
#   KAFKA_STATE_DIR        ~/.local/state/patchd/kafka-<port>: one broker per port, data kept across restarts
#   KAFKA_CACHE_DIR        ~/.cache/patchd/kafka-<version>: jars are shared by every broker of a version
#   KAFKA_HEAP_OPTS        -Xmx512m -Xms128m: enough for a test broker, small on a 2-core/24 GiB machine
#   KAFKA_JVM_PERFORMANCE_OPTS  C1 only + serial GC: halves start-up on 2 busy cores; a dev broker
#                          never runs long or hard enough for C2 or a parallel collector to pay off
#   KAFKA_START_TIMEOUT    120 s: a cold JVM + KRaft election on a loaded 2-core machine takes ~10 s
#   KAFKA_STOP_TIMEOUT     60 s: a clean shutdown flushes logs and closes the controller quorum
# See README.md beside this file for the version choice.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# Kafka 4.1.x: see README.md ("Version"). log4j 2.25.3 is the version kafka_2.13 4.1.2 itself
# resolves to, so the slf4j binding matches log4j-core exactly.
KAFKA_VERSION=${KAFKA_VERSION:-4.1.2}
LOG4J_VERSION=${LOG4J_VERSION:-2.25.3}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}
KAFKA_STATE_DIR=${KAFKA_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/patchd/kafka-$KAFKA_PORT}
KAFKA_CACHE_DIR=${KAFKA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/patchd/kafka-$KAFKA_VERSION}
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xmx512m -Xms128m}
KAFKA_JVM_PERFORMANCE_OPTS=${KAFKA_JVM_PERFORMANCE_OPTS:--XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Djava.awt.headless=true}
KAFKA_START_TIMEOUT=${KAFKA_START_TIMEOUT:-120}
KAFKA_STOP_TIMEOUT=${KAFKA_STOP_TIMEOUT:-60}

PID_FILE="$KAFKA_STATE_DIR/broker.pid"
LOG_FILE="$KAFKA_STATE_DIR/broker.log"
PROPS="$KAFKA_STATE_DIR/server.properties"
DATA="$KAFKA_STATE_DIR/kafka-data"
BOOTSTRAP="127.0.0.1:$KAFKA_PORT"

SERVICE=broker.sh
PRODUCT="Apache Kafka $KAFKA_VERSION"
CACHE_DIR=$KAFKA_CACHE_DIR
PROCESS_MATCH="*kafka.Kafka*$PROPS*"
START_TIMEOUT=$KAFKA_START_TIMEOUT
STOP_TIMEOUT=$KAFKA_STOP_TIMEOUT
# die, need_java, fetch_jars, service_pid, wait_ready, stop_service, service_status
# shellcheck source=../lib/jvm-service.sh
. "$HERE/../lib/jvm-service.sh"

fetch() {
  fetch_jars "$HERE/pom.xml" "kafka_2.13-*.jar" -Dkafka.version="$KAFKA_VERSION" -Dlog4j.version="$LOG4J_VERSION"
}

# Does a Kafka broker answer on the port? Sends ApiVersions v0 and wants error_code 0 back:
# an open port alone is not enough (the socket server accepts before request handling starts).
answers() {
  python3 - "$KAFKA_PORT" <<'PY' 2>/dev/null
import socket, struct, sys
req = struct.pack(">hhih", 18, 0, 7, 6) + b"patchd"  # ApiVersions v0, correlation id 7, client "patchd"
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2) as s:
        s.sendall(struct.pack(">i", len(req)) + req)
        buf = b""
        while len(buf) < 10:
            chunk = s.recv(4096)
            if not chunk:
                sys.exit(1)
            buf += chunk
except OSError:
    sys.exit(1)
corr, err = struct.unpack(">ih", buf[4:10])
sys.exit(0 if corr == 7 and err == 0 else 1)
PY
}

write_properties() {
  mkdir -p "$KAFKA_STATE_DIR"
  cat >"$PROPS" <<EOF
# Written by deploy/kafka/broker.sh on every start; edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$DATA
# one node: every internal topic has exactly one replica
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# a single-node dev broker gains nothing from 50 partitions per internal topic but start-up time
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
# tests start a consumer group and expect partitions at once, not after the default 3 s delay
group.initial.rebalance.delay.ms=0
num.partitions=1
EOF
}

start() {
  local pid
  if pid=$(service_pid); then
    wait_ready "$pid" "$BOOTSTRAP"
    echo "$BOOTSTRAP"
    return 0
  fi
  rm -f "$PID_FILE"
  if answers; then
    die "port $KAFKA_PORT already serves a Kafka broker that was not started from $KAFKA_STATE_DIR"
  fi
  need_java
  fetch
  write_properties
  if [ ! -f "$DATA/meta.properties" ]; then
    # Kafka's cluster ids are url-safe base64 of a random UUID without padding (Uuid.toString);
    # one that starts with '-' would read as an option, and Kafka refuses it too.
    local cluster_id
    cluster_id=$(python3 -c 'import base64,uuid
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    if not s.startswith("-"): print(s); break')
    # shellcheck disable=SC2086
    "$JAVA" $KAFKA_HEAP_OPTS $KAFKA_JVM_PERFORMANCE_OPTS -cp "$LIB/*" -Dlog4j2.configurationFile="$HERE/log4j2.properties" \
      kafka.tools.StorageTool format -t "$cluster_id" -c "$PROPS" >>"$LOG_FILE" 2>&1 \
      || { tail -n 30 "$LOG_FILE" >&2; die "kafka.tools.StorageTool format failed (log: $LOG_FILE)"; }
  fi
  # nohup + </dev/null + log redirection: the broker outlives this script and holds no pipe of
  # the caller's (a caller that captures our output would otherwise wait for the broker to exit).
  # shellcheck disable=SC2086  # both *_OPTS are lists of JVM flags
  nohup "$JAVA" $KAFKA_HEAP_OPTS $KAFKA_JVM_PERFORMANCE_OPTS \
    -Dlog4j2.configurationFile="$HERE/log4j2.properties" -cp "$LIB/*" \
    kafka.Kafka "$PROPS" </dev/null >>"$LOG_FILE" 2>&1 &
  pid=$!
  echo "$pid" >"$PID_FILE"
  wait_ready "$pid" "$BOOTSTRAP"
  echo "$BOOTSTRAP"
}

status() {
  service_status "bootstrap=$BOOTSTRAP state=$KAFKA_STATE_DIR"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop_service ;;
  status) status ;;
  *) echo "usage: $0 fetch|start|stop|status" >&2; exit 2 ;;
esac
