# shellcheck shell=bash
# What deploy/kafka/broker.sh and deploy/s3/server.sh share: one Java server from Maven Central jars,
# run in the background with a pid file and a log in its state directory. Sourced, not run.
#
# The caller sets, before sourcing:
#   SERVICE        the script's name for messages ("broker.sh")
#   PRODUCT        what it runs, for messages ("Apache Kafka 4.1.2")
#   CACHE_DIR      where the jars are kept (LIB=$CACHE_DIR/lib)
#   PID_FILE LOG_FILE
#   PROCESS_MATCH  a glob the process's command line must match (main class and config file): a pid
#                  file naming a reused pid of another process is not ours
#   START_TIMEOUT STOP_TIMEOUT (seconds)
# and defines `answers` (exit 0 when the server answers a real request, not just an open port).

LIB="$CACHE_DIR/lib"
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java

die() { echo "$SERVICE: $*" >&2; exit 1; }

need_java() {
  command -v "$JAVA" >/dev/null 2>&1 || die "java not found ($PRODUCT needs Java 17+); run deploy/system-deps.sh"
  local major
  major=$("$JAVA" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p')
  [ -n "$major" ] && [ "$major" -ge 17 ] || die "$PRODUCT needs Java 17+, $JAVA is ${major:-unknown}"
}

# fetch_jars POM JAR_GLOB [MVN_PROPERTY ...]: every runtime jar POM names, into $LIB, once.
# Two sessions may fetch at once: they are serialised (the lock lives in a subshell, so a server
# started later does not inherit it), and the jars appear with one rename.
fetch_jars() {
  local pom=$1 glob=$2
  shift 2
  [ -f "$LIB/.complete" ] && return 0
  command -v mvn >/dev/null 2>&1 || die "mvn not found (needed once to fetch the $PRODUCT jars); run deploy/system-deps.sh"
  mkdir -p "$(dirname "$CACHE_DIR")"
  (
    command -v flock >/dev/null 2>&1 && flock 9
    [ -f "$LIB/.complete" ] && exit 0
    work=$(mktemp -d "$CACHE_DIR.tmp.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    cp "$pom" "$work/pom.xml"
    echo "$SERVICE: fetching $PRODUCT jars from Maven Central into $LIB" >&2
    (cd "$work" && mvn -q -B -Dstyle.color=never dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$work/lib" "$@" >&2) \
      || die "mvn could not fetch the $PRODUCT jars (see the output above)"
    # shellcheck disable=SC2086  # the glob is meant to expand
    ls "$work"/lib/$glob >/dev/null 2>&1 || die "the fetch produced no $glob"
    touch "$work/lib/.complete"
    mkdir -p "$CACHE_DIR"
    rm -rf "$LIB"
    mv "$work/lib" "$LIB"
  ) 9>"$CACHE_DIR.lock"
}

# The pid in the pid file, if that process is alive and is this state dir's server (pids get reused).
service_pid() {
  [ -f "$PID_FILE" ] || return 1
  local pid args
  pid=$(cat "$PID_FILE")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  if [ -r "/proc/$pid/cmdline" ]; then args=$(tr '\0' ' ' <"/proc/$pid/cmdline"); else args=$(ps -o args= -p "$pid" || true); fi
  # shellcheck disable=SC2053  # PROCESS_MATCH is a glob
  [[ $args == $PROCESS_MATCH ]] && echo "$pid" || return 1
}

# wait_ready PID WHERE: until `answers`; the log's tail and a clear error when the JVM dies or the time is up
wait_ready() {
  local pid=$1 where=$2 deadline=$((SECONDS + START_TIMEOUT))
  until answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PID_FILE"
      tail -n 40 "$LOG_FILE" >&2
      die "the server exited during start-up (log: $LOG_FILE)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 40 "$LOG_FILE" >&2
      stop_service >&2 || true
      die "the server did not answer on $where within ${START_TIMEOUT}s (log: $LOG_FILE)"
    fi
    sleep 0.2
  done
}

# SIGTERM, then wait for a clean exit (SIGKILL only after STOP_TIMEOUT)
stop_service() {
  local pid deadline
  if ! pid=$(service_pid); then
    rm -f "$PID_FILE"
    echo "stopped"
    return 0
  fi
  kill -TERM "$pid"
  deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      kill -KILL "$pid" 2>/dev/null || true
      rm -f "$PID_FILE"
      die "the server (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s and was killed (log: $LOG_FILE)"
    fi
    sleep 0.1
  done
  rm -f "$PID_FILE"
  echo "stopped"
}

# service_status DESCRIPTION: exit 0 running and answering, 1 running but not answering, 3 stopped
service_status() {
  local pid
  if ! pid=$(service_pid); then
    echo "stopped"
    return 3
  fi
  if answers; then
    echo "running pid=$pid $1"
    return 0
  fi
  echo "not answering pid=$pid $1 (log: $LOG_FILE)"
  return 1
}
