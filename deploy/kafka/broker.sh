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
# Two modes, chosen by KAFKA_SECURITY and fixed when a state directory is first formatted:
#   plaintext  (default) one PLAINTEXT listener, no authentication, no ACLs: development and tests
#   sasl_ssl   secured as a production cluster is: clients use a SASL_SSL listener (TLS with a
#              certificate for 127.0.0.1 and localhost from a private CA the script makes;
#              SCRAM-SHA-512 users created at format time), the StandardAuthorizer denies what no
#              ACL allows, and the controller listener stays PLAINTEXT on loopback. Users, with
#              random passwords in files of mode 0600: admin (super user); patchd, which reads
#              KAFKA_TOPIC and the groups KAFKA_GROUP_PREFIX* and writes <topic>.dlq and
#              <topic>.releases; producer, which writes KAFKA_TOPIC. `start` creates the three
#              topics and the ACLs (daemon/tools/kafka_acls.py), prints what a client needs (CA
#              file, users, patchd's environment file) and, as its last line, the bootstrap address.
#
# Environment (each default with its reason):
#   KAFKA_SECURITY         plaintext: the tests' and the quickstart's broker; sasl_ssl: see above
#   KAFKA_PORT             9092 (sasl_ssl: 9094): the port every Kafka client tries first; the secured
#                          default differs so that both default brokers can run side by side
#   KAFKA_CONTROLLER_PORT  KAFKA_PORT+1: the conventional controller port next to the broker's
#   KAFKA_STATE_DIR        ~/.local/state/patchd/kafka-<port>: one broker per port, data kept across restarts
#   KAFKA_CACHE_DIR        ~/.cache/patchd/kafka-<version>: jars are shared by every broker of a version
#   KAFKA_HEAP_OPTS        -Xmx512m -Xms128m: enough for a test broker, small on a 2-core/24 GiB machine
#   KAFKA_JVM_PERFORMANCE_OPTS  C1 only + serial GC: halves start-up on 2 busy cores; a dev broker
#                          never runs long or hard enough for C2 or a parallel collector to pay off
#   KAFKA_START_TIMEOUT    120 s: a cold JVM + KRaft election on a loaded 2-core machine takes ~10 s
#   KAFKA_STOP_TIMEOUT     60 s: a clean shutdown flushes logs and closes the controller quorum
#   sasl_ssl only:
#   KAFKA_TOPIC            corrections: patchd's default [kafka] topic
#   KAFKA_GROUP_PREFIX     patchd-: patchd's consumer groups are patchd-<model>
#   KAFKA_PYTHON           <repo>/.venv/bin/python, else python3: a Python with kafka-python, which
#                          creates the topics and ACLs (the cached broker jars have no ACL tool)
# See README.md beside this file for the version choice and the secured mode's files.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# Kafka 4.1.x: see README.md ("Version"). log4j 2.25.3 is the version kafka_2.13 4.1.2 itself
# resolves to, so the slf4j binding matches log4j-core exactly.
KAFKA_VERSION=${KAFKA_VERSION:-4.1.2}
LOG4J_VERSION=${LOG4J_VERSION:-2.25.3}
KAFKA_SECURITY=${KAFKA_SECURITY:-plaintext}
if [ "$KAFKA_SECURITY" = sasl_ssl ]; then SECURED=true; else SECURED=false; fi
if $SECURED; then KAFKA_PORT=${KAFKA_PORT:-9094}; else KAFKA_PORT=${KAFKA_PORT:-9092}; fi
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}
KAFKA_STATE_DIR=${KAFKA_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/patchd/kafka-$KAFKA_PORT}
KAFKA_CACHE_DIR=${KAFKA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/patchd/kafka-$KAFKA_VERSION}
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xmx512m -Xms128m}
KAFKA_JVM_PERFORMANCE_OPTS=${KAFKA_JVM_PERFORMANCE_OPTS:--XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Djava.awt.headless=true}
KAFKA_START_TIMEOUT=${KAFKA_START_TIMEOUT:-120}
KAFKA_STOP_TIMEOUT=${KAFKA_STOP_TIMEOUT:-60}
KAFKA_TOPIC=${KAFKA_TOPIC:-corrections}
KAFKA_GROUP_PREFIX=${KAFKA_GROUP_PREFIX:-patchd-}
if [ -z "${KAFKA_PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then KAFKA_PYTHON=$ROOT/.venv/bin/python; else KAFKA_PYTHON=python3; fi
fi

PID_FILE="$KAFKA_STATE_DIR/broker.pid"
LOG_FILE="$KAFKA_STATE_DIR/broker.log"
PROPS="$KAFKA_STATE_DIR/server.properties"
DATA="$KAFKA_STATE_DIR/kafka-data"
BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
# sasl_ssl: certificates (the CA's and the broker's are public, keys 0600) and secrets (a 0700
# directory, whose presence marks the state directory as a secured broker's)
TLS_DIR="$KAFKA_STATE_DIR/tls"
CA_FILE="$TLS_DIR/ca.pem"
SECRETS_DIR="$KAFKA_STATE_DIR/secrets"
USERS="admin patchd producer"
MECHANISM=SCRAM-SHA-512

SERVICE=broker.sh
PRODUCT="Apache Kafka $KAFKA_VERSION"
CACHE_DIR=$KAFKA_CACHE_DIR
PROCESS_MATCH="*kafka.Kafka*$PROPS*"
START_TIMEOUT=$KAFKA_START_TIMEOUT
STOP_TIMEOUT=$KAFKA_STOP_TIMEOUT
# die, need_java, fetch_jars, service_pid, wait_ready, stop_service, service_status
# shellcheck source=../lib/jvm-service.sh
. "$HERE/../lib/jvm-service.sh"

case "$KAFKA_SECURITY" in
  plaintext | sasl_ssl) ;;
  *) die "KAFKA_SECURITY must be plaintext or sasl_ssl, not '$KAFKA_SECURITY'" ;;
esac

fetch() {
  fetch_jars "$HERE/pom.xml" "kafka_2.13-*.jar" -Dkafka.version="$KAFKA_VERSION" -Dlog4j.version="$LOG4J_VERSION"
}

# Was this state directory made for the secured mode? `status` probes a broker as its state
# directory says, whatever KAFKA_SECURITY is; `start` refuses to switch a directory's mode.
secured_state() { [ -d "$SECRETS_DIR" ]; }

# Does a Kafka broker answer on the port? Sends ApiVersions v0 and wants error_code 0 back:
# an open port alone is not enough (the socket server accepts before request handling starts).
# A secured broker is asked over TLS, its certificate checked against our CA: ApiVersions is the
# one request a SASL listener answers before authentication.
answers() {
  local cafile=""
  if secured_state; then cafile=$CA_FILE; fi
  python3 - "$KAFKA_PORT" "$cafile" <<'PY' 2>/dev/null
import socket, ssl, struct, sys
req = struct.pack(">hhih", 18, 0, 7, 6) + b"patchd"  # ApiVersions v0, correlation id 7, client "patchd"
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2) as s:
        if sys.argv[2]:
            s = ssl.create_default_context(cafile=sys.argv[2]).wrap_socket(s, server_hostname="127.0.0.1")
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

secret() { cat "$SECRETS_DIR/$1.password"; }

# Random passwords for the keystore and every user, once: SCRAM credentials are fixed at format time.
make_secrets() {
  mkdir -p "$SECRETS_DIR"
  chmod 0700 "$SECRETS_DIR"
  local name
  for name in keystore $USERS; do
    [ -s "$SECRETS_DIR/$name.password" ] && continue
    [ ! -f "$DATA/meta.properties" ] \
      || die "$SECRETS_DIR/$name.password is missing but the storage is formatted with it; delete $KAFKA_STATE_DIR (broker stopped) to start afresh"
    # hex: safe as is in the JAAS line, in --add-scram's [name=...,password=...] and in env files
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(24))' >"$SECRETS_DIR/$name.password")
  done
}

# A private CA and the broker's certificate for 127.0.0.1 and localhost (so clients keep hostname
# checks on), once per state directory. EC P-256 keys: made in milliseconds, and every client here
# (Java, kafka-python, librdkafka) speaks ECDSA. The keystore is written last: its presence means done.
make_tls() {
  [ -f "$TLS_DIR/broker.p12" ] && return 0
  command -v openssl >/dev/null 2>&1 || die "openssl not found (KAFKA_SECURITY=sasl_ssl makes its certificates with it)"
  mkdir -p "$TLS_DIR"
  (
    umask 077
    cd "$TLS_DIR"
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 3650 \
      -subj "/CN=patchd development Kafka CA $(date -u +%Y%m%dT%H%M%SZ)" -keyout ca.key -out ca.pem \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -subj "/CN=localhost" \
      -keyout broker.key -out broker.csr
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=IP:127.0.0.1,DNS:localhost" >broker.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
      -days 825 -sha256 -extfile broker.ext -out broker.pem
    openssl pkcs12 -export -name broker -in broker.pem -inkey broker.key -certfile ca.pem \
      -passout "file:$SECRETS_DIR/keystore.password" -out broker.p12.tmp
    rm -f broker.csr broker.ext
    chmod 0644 ca.pem broker.pem
    mv broker.p12.tmp broker.p12
  ) >>"$LOG_FILE" 2>&1 || { tail -n 20 "$LOG_FILE" >&2; die "openssl could not make the certificates (log: $LOG_FILE)"; }
}

# The client listener and the one the broker uses to reach itself (inter-broker), by mode.
listener_properties() {
  if $SECURED; then
    cat <<EOF
listeners=SASL_SSL://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=SASL_SSL://127.0.0.1:$KAFKA_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
controller.listener.names=CONTROLLER
inter.broker.listener.name=SASL_SSL
EOF
  else
    cat <<EOF
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
EOF
  fi
}

security_properties() {
  cat <<EOF
# TLS: the broker's key and chain (PKCS12); it trusts our CA for its own inter-broker connections
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS_DIR/broker.p12
ssl.keystore.password=$(secret keystore)
ssl.truststore.type=PEM
ssl.truststore.location=$CA_FILE
# SCRAM-SHA-512 only (credentials live in the cluster metadata, made at format time); the broker
# logs in to itself as admin
sasl.enabled.mechanisms=$MECHANISM
sasl.mechanism.inter.broker.protocol=$MECHANISM
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(secret admin)";
# ACLs: nothing is allowed that no ACL grants. ANONYMOUS is the principal of every PLAINTEXT
# connection, and the only PLAINTEXT listener is the controller's on loopback, where this JVM's
# broker half registers and heartbeats: it needs cluster rights before any ACL can exist (a
# multi-host cluster secures its controller listener too; see README.md)
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin;User:ANONYMOUS
EOF
}

write_properties() {
  mkdir -p "$KAFKA_STATE_DIR"
  (
    # secured: 0600, the file holds the keystore's and admin's passwords
    if $SECURED; then umask 077; fi
    {
      cat <<EOF
# Written by deploy/kafka/broker.sh on every start; edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
EOF
      listener_properties
      cat <<EOF
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
      if $SECURED; then security_properties; fi
    } >"$PROPS"
  )
}

# One argument of a java @argfile: quoted, backslashes and quotes escaped.
argline() {
  local arg=${1//\\/\\\\}
  printf '"%s"\n' "${arg//\"/\\\"}"
}

# kafka.tools.StorageTool format, once. The arguments go through a java @argfile (mode 0600,
# removed after): SCRAM passwords on a command line would be readable by any local user in /proc.
format_storage() {
  # Kafka's cluster ids are url-safe base64 of a random UUID without padding (Uuid.toString);
  # one that starts with '-' would read as an option, and Kafka refuses it too.
  local cluster_id args="$KAFKA_STATE_DIR/format.args"
  cluster_id=$(python3 -c 'import base64,uuid
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    if not s.startswith("-"): print(s); break')
  (
    umask 077
    trap 'rm -f "$args"' EXIT
    {
      for arg in kafka.tools.StorageTool format -t "$cluster_id" -c "$PROPS"; do argline "$arg"; done
      if $SECURED; then
        for user in $USERS; do
          argline --add-scram
          argline "$MECHANISM=[name=$user,password=$(secret "$user")]"
        done
      fi
    } >"$args"
    # shellcheck disable=SC2086  # both *_OPTS are lists of JVM flags
    "$JAVA" $KAFKA_HEAP_OPTS $KAFKA_JVM_PERFORMANCE_OPTS -cp "$LIB/*" -Dlog4j2.configurationFile="$HERE/log4j2.properties" \
      "@$args" >>"$LOG_FILE" 2>&1
  ) || { tail -n 30 "$LOG_FILE" >&2; die "kafka.tools.StorageTool format failed (log: $LOG_FILE)"; }
}

# What clients need, rewritten on every start (the port may have changed): patchd's environment
# file (KEY=value, no quotes, as deploy/patchd.env.example) and admin's client properties for
# Kafka's own command-line tools (--command-config).
write_client_files() {
  (
    umask 077
    cat >"$SECRETS_DIR/patchd.env" <<EOF
# Written by deploy/kafka/broker.sh on every start: patchd's Kafka settings for this broker, as its
# own user. An environment file (systemd EnvironmentFile=, or: set -a; . FILE; set +a).
PATCHD_KAFKA_BOOTSTRAP_SERVERS=$BOOTSTRAP
PATCHD_KAFKA_TOPIC=$KAFKA_TOPIC
PATCHD_KAFKA_SECURITY_PROTOCOL=SASL_SSL
PATCHD_KAFKA_SSL_CAFILE=$CA_FILE
PATCHD_KAFKA_SASL_MECHANISM=$MECHANISM
PATCHD_KAFKA_SASL_PLAIN_USERNAME=patchd
PATCHD_KAFKA_SASL_PLAIN_PASSWORD=$(secret patchd)
EOF
    cat >"$SECRETS_DIR/admin.properties" <<EOF
# Written by deploy/kafka/broker.sh on every start: the super user's settings for Kafka's tools
bootstrap.servers=$BOOTSTRAP
security.protocol=SASL_SSL
ssl.truststore.type=PEM
ssl.truststore.location=$CA_FILE
sasl.mechanism=$MECHANISM
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(secret admin)";
EOF
  )
}

# The topics and ACLs, as admin. Idempotent, so on every start: KAFKA_TOPIC may have changed.
grant_acls() {
  "$KAFKA_PYTHON" -I "$ROOT/daemon/tools/kafka_acls.py" --bootstrap "$BOOTSTRAP" --cafile "$CA_FILE" \
    --password-file "$SECRETS_DIR/admin.password" --topic "$KAFKA_TOPIC" --group-prefix "$KAFKA_GROUP_PREFIX" \
    || die "could not create the topics and ACLs as admin on $BOOTSTRAP (broker log: $LOG_FILE)"
}

# The secured broker is ready once admin has made its topics and ACLs; then what a client needs
# is printed: where the CA and the passwords are, never a password.
secured_ready() {
  write_client_files
  grant_acls
  echo "security: SASL_SSL, mechanism $MECHANISM"
  echo "ca: $CA_FILE"
  echo "users: admin (super user), patchd (the daemon), producer (writes $KAFKA_TOPIC); passwords in $SECRETS_DIR/<user>.password (0600)"
  echo "topics: $KAFKA_TOPIC $KAFKA_TOPIC.dlq $KAFKA_TOPIC.releases"
  echo "patchd environment file: $SECRETS_DIR/patchd.env"
}

start() {
  local pid
  if $SECURED && [ -f "$DATA/meta.properties" ] && ! secured_state; then
    die "$KAFKA_STATE_DIR holds a plaintext broker; give KAFKA_SECURITY=sasl_ssl its own KAFKA_STATE_DIR (or delete this one)"
  fi
  if ! $SECURED && secured_state; then
    die "$KAFKA_STATE_DIR holds a sasl_ssl broker; start it with KAFKA_SECURITY=sasl_ssl"
  fi
  if $SECURED; then
    # before the JVM: a Python without kafka-python should cost a second, not a broker start
    "$KAFKA_PYTHON" -I -c 'import kafka' 2>/dev/null \
      || die "KAFKA_PYTHON=$KAFKA_PYTHON cannot import kafka-python: run deploy/setup.sh, or point KAFKA_PYTHON at a Python that has it"
  fi
  if pid=$(service_pid); then
    wait_ready "$pid" "$BOOTSTRAP"
    if $SECURED; then secured_ready; fi
    echo "$BOOTSTRAP"
    return 0
  fi
  rm -f "$PID_FILE"
  if answers; then
    die "port $KAFKA_PORT already serves a Kafka broker that was not started from $KAFKA_STATE_DIR"
  fi
  need_java
  fetch
  if $SECURED; then
    make_secrets
    make_tls
  fi
  write_properties
  if [ ! -f "$DATA/meta.properties" ]; then
    format_storage
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
  if $SECURED; then secured_ready; fi
  echo "$BOOTSTRAP"
}

status() {
  local mode=""
  if secured_state; then mode=" security=sasl_ssl"; fi
  service_status "bootstrap=$BOOTSTRAP state=$KAFKA_STATE_DIR$mode"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop_service ;;
  status) status ;;
  *) echo "usage: $0 fetch|start|stop|status" >&2; exit 2 ;;
esac
