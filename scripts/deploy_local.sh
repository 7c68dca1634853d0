#!/usr/bin/env bash
# Rehearse a real deployment on this machine: one SuperLink and N SuperNodes
# on 127.0.0.1 (TLS with a throw-away CA unless --insecure), run the app on
# them, stream its log, wait for its final status and exit 0 only when the
# run finished as completed. Every process started here is stopped on exit,
# whatever the outcome.
#
# usage: scripts/deploy_local.sh [--insecure] [--num-nodes N] [--run-config "k=v ..."]
#                                [--local-data] [--timeout SECONDS] [--work-dir DIR] [--keep]
#
#   --insecure        plain HTTP instead of TLS
#   --num-nodes N     SuperNodes (default 2); node i gets "partition-id=i num-partitions=N"
#   --run-config S    as for `flwr run --run-config` (strings in single quotes)
#   --local-data      the last SuperNode trains on local files (local-data=DIR, see
#                     fedlt_app/data/local.py), exported here from its partition
#   --timeout S       give up (and fail) after S seconds (default 3600)
#   --work-dir DIR    FLWR_HOME, certificates and logs go here (kept); default: a fresh
#                     temporary directory, removed after a successful run unless --keep
#
# Exit status: 0 run finished:completed; 1 run failed, timed out or a process died;
# 2 usage error or the run was not accepted.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

INSECURE=0
NUM_NODES=2
RUN_CONFIG=""
LOCAL_DATA=0
TIMEOUT=3600
WORK_DIR=""
KEEP=0
CONNECTION="fedlt-deploy"

usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die_usage() { echo "deploy_local: $*" >&2; usage >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --insecure) INSECURE=1 ;;
    --num-nodes) [ $# -ge 2 ] || die_usage "--num-nodes needs a value"; NUM_NODES="$2"; shift ;;
    --run-config) [ $# -ge 2 ] || die_usage "--run-config needs a value"; RUN_CONFIG="$2"; shift ;;
    --local-data) LOCAL_DATA=1 ;;
    --timeout) [ $# -ge 2 ] || die_usage "--timeout needs a value"; TIMEOUT="$2"; shift ;;
    --work-dir) [ $# -ge 2 ] || die_usage "--work-dir needs a value"; WORK_DIR="$2"; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die_usage "unknown argument: $1" ;;
  esac
  shift
done
[[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || die_usage "--num-nodes must be a positive integer (got '$NUM_NODES')"
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die_usage "--timeout must be a positive number of seconds (got '$TIMEOUT')"

# The app's virtual environment when there is one, else whatever is on PATH.
if [ -x "$ROOT/.venv/bin/flwr" ]; then
  BIN="$ROOT/.venv/bin/"; PY="$ROOT/.venv/bin/python"
  export PATH="$ROOT/.venv/bin:$PATH"  # the SuperLink and SuperNodes start flower-superexec by name
else
  BIN=""; PY="$(command -v python3 || command -v python)"
fi
for tool in flwr flower-superlink flower-supernode; do
  command -v "${BIN}${tool}" >/dev/null || die_usage "${BIN}${tool} not found (run scripts/setup.sh, or activate the app's environment)"
done
[ "$INSECURE" = 1 ] || command -v openssl >/dev/null || die_usage "openssl is needed for TLS (or pass --insecure)"

if [ -n "$WORK_DIR" ]; then
  mkdir -p "$WORK_DIR"; WORK="$(cd "$WORK_DIR" && pwd)"; TEMP_WORK=0
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/fedlt-deploy.XXXXXX")"; TEMP_WORK=1
fi
mkdir -p "$WORK/logs"

export FLWR_HOME="$WORK/flwr-home"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export HF_HUB_OFFLINE=1
mkdir -p "$FLWR_HOME"

STARTED=()        # process-group leaders started here (SuperLink, SuperNodes, log stream)
SUCCESS=0
MY_PGID="$(ps -o pgid= -p $$ | tr -d ' ')"

# Start "$@" in the background as the leader of its own process group (job
# control on just for the fork), so that cleanup can signal the whole group:
# the SuperLink's SuperExec and ServerApp, a SuperNode's ClientApps.
start_group() {
  local log="$1"; shift
  set -m
  "$@" >"$log" 2>&1 </dev/null &
  LAST_PID=$!
  set +m
  STARTED+=("$LAST_PID")
}

alive() { kill -0 "$1" 2>/dev/null; }

# Processes that carry this run's FLWR_HOME in their environment, outside the
# script's own process group (a safety net for anything that left its group).
strays() {
  local env pid pgid
  for env in /proc/[0-9]*/environ; do
    pid="${env#/proc/}"; pid="${pid%/environ}"
    [ "$pid" = "$$" ] && continue
    if { tr '\0' '\n' <"$env"; } 2>/dev/null | grep -qxF "FLWR_HOME=$FLWR_HOME"; then
      pgid="$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" || continue
      [ -n "$pgid" ] && [ "$pgid" != "$MY_PGID" ] && echo "$pid"
    fi
  done
  return 0
}

cleanup() {
  local code=$? pid waited
  trap - EXIT INT TERM
  set +eu
  for pid in "${STARTED[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  for waited in $(seq 1 40); do
    local any=0
    for pid in "${STARTED[@]}"; do alive "$pid" && any=1; done
    [ "$any" = 0 ] && break
    sleep 0.25
  done
  for pid in "${STARTED[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
  if [ -d /proc/self ]; then
    for pid in $(strays); do kill -KILL "$pid" 2>/dev/null; done
  fi
  wait 2>/dev/null
  if [ "$SUCCESS" = 1 ] && [ "$TEMP_WORK" = 1 ] && [ "$KEEP" = 0 ]; then
    rm -rf "$WORK"
  else
    echo "deploy_local: logs, certificates and Flower state are in $WORK" >&2
  fi
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  echo "deploy_local: $*" >&2
  local log
  for log in "$WORK"/logs/*.log; do
    [ -f "$log" ] || continue
    echo "----- last lines of $log -----" >&2
    tail -n 15 "$log" >&2
  done
  exit 1
}

# Free loopback ports: one for the SuperLink, one per SuperNode (its local Runtime API).
read -r -a PORTS <<<"$("$PY" - "$((NUM_NODES + 1))" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
LINK_PORT="${PORTS[0]}"

# TLS: a throw-away CA and a server certificate for localhost / 127.0.0.1.
if [ "$INSECURE" = 1 ]; then
  LINK_TLS=(--insecure)
  NODE_TLS=(--insecure)
  CONN_TLS="insecure = true"
else
  CERTS="$WORK/certs"
  mkdir -p "$CERTS"
  (
    cd "$CERTS"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=fedlt deploy_local CA" \
      -keyout ca.key -out ca.crt \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
      -extfile server.ext -out server.pem
  ) >"$WORK/logs/openssl.txt" 2>&1 || { cat "$WORK/logs/openssl.txt" >&2; fail "certificate generation failed"; }
  LINK_TLS=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key")
  NODE_TLS=(--root-certificates "$CERTS/ca.crt")
  CONN_TLS="root-certificates = \"$CERTS/ca.crt\""
fi

cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "$CONNECTION"

[superlink.$CONNECTION]
address = "127.0.0.1:$LINK_PORT"
$CONN_TLS
EOF

say() { echo "deploy_local [$((SECONDS))s]: $*"; }

say "SuperLink on 127.0.0.1:$LINK_PORT ($([ "$INSECURE" = 1 ] && echo insecure || echo TLS)), $NUM_NODES SuperNodes, work dir $WORK"
start_group "$WORK/logs/superlink.log" "${BIN}flower-superlink" "${LINK_TLS[@]}" \
  --disable-runtime-dependency-installation --database "$WORK/superlink-state.db" \
  --host 127.0.0.1 --port "$LINK_PORT"
LINK_PID=$LAST_PID

# Local files for the last node, exported from its own partition of the run's
# data set (while the SuperLink starts).
LOCAL_NODE=-1
if [ "$LOCAL_DATA" = 1 ]; then
  LOCAL_NODE=$((NUM_NODES - 1))
  LOCAL_DIR="$WORK/local-data/node-$LOCAL_NODE"
  rm -rf "$LOCAL_DIR"
  "$PY" -m fedlt_app.data.local export --run-config "$RUN_CONFIG" \
    --partition-id "$LOCAL_NODE" --num-partitions "$NUM_NODES" "$LOCAL_DIR" \
    || fail "could not export partition $LOCAL_NODE as local data"
fi

# SuperNodes retry until the SuperLink answers, so they can start right away.
NODE_PIDS=()
for ((i = 0; i < NUM_NODES; i++)); do
  node_config="partition-id=$i num-partitions=$NUM_NODES"
  [ "$i" = "$LOCAL_NODE" ] && node_config="$node_config local-data='$LOCAL_DIR'"
  start_group "$WORK/logs/supernode-$i.log" "${BIN}flower-supernode" "${NODE_TLS[@]}" \
    --superlink "127.0.0.1:$LINK_PORT" --port "${PORTS[$((i + 1))]}" --node-config "$node_config"
  NODE_PIDS+=("$LAST_PID")
  say "SuperNode $i: --node-config \"$node_config\" (log: $WORK/logs/supernode-$i.log)"
done

deadline=$((SECONDS + 120))
until (exec 3<>"/dev/tcp/127.0.0.1/$LINK_PORT") 2>/dev/null; do
  alive "$LINK_PID" || fail "flower-superlink exited early"
  [ "$SECONDS" -lt "$deadline" ] || fail "flower-superlink did not listen on port $LINK_PORT within 120 s"
  sleep 0.3
done

RUN_ARGS=(run . "$CONNECTION" --format json)
[ -n "$RUN_CONFIG" ] && RUN_ARGS+=(--run-config "$RUN_CONFIG")
submitted="$("${BIN}flwr" "${RUN_ARGS[@]}" 2>"$WORK/logs/flwr-run.err")" || true
RUN_ID="$(printf '%s' "$submitted" | "$PY" -c 'import json, sys; print(int(json.load(sys.stdin)["run-id"]))' 2>/dev/null)" || {
  printf '%s\n' "$submitted" >&2; cat "$WORK/logs/flwr-run.err" >&2
  echo "deploy_local: the run was not accepted (see above)" >&2
  exit 2
}
say "run $RUN_ID submitted; streaming its log"
set -m
"${BIN}flwr" log "$RUN_ID" "$CONNECTION" --stream </dev/null &
STREAM_PID=$!
STARTED+=("$STREAM_PID")
set +m

run_status() {
  "${BIN}flwr" list "$CONNECTION" --run-id "$RUN_ID" --format json 2>/dev/null \
    | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])' 2>/dev/null || echo unknown
}

# The log stream ends when the run does. Each `flwr list` costs about a CPU
# second, so the status is asked rarely while the stream is open, often after.
deadline=$((SECONDS + TIMEOUT))
STATUS=unknown
next_check=$SECONDS
stream_open=1
while :; do
  if [ "$stream_open" = 1 ] && ! alive "$STREAM_PID"; then stream_open=0; next_check=$SECONDS; fi
  if [ "$SECONDS" -ge "$next_check" ]; then
    STATUS="$(run_status)"
    [[ "$STATUS" == finished* ]] && break
    next_check=$((SECONDS + (stream_open ? 15 : 2)))
  fi
  [ "$SECONDS" -lt "$deadline" ] || fail "run $RUN_ID did not finish within $TIMEOUT s (status $STATUS)"
  alive "$LINK_PID" || fail "flower-superlink died during run $RUN_ID"
  for ((i = 0; i < NUM_NODES; i++)); do
    alive "${NODE_PIDS[$i]}" || fail "SuperNode $i died during run $RUN_ID"
  done
  sleep 1
done
for _ in 1 2 3 4 5; do alive "$STREAM_PID" || break; sleep 1; done  # let the stream print the last lines

if [ "$STATUS" != "finished:completed" ]; then
  fail "run $RUN_ID ended with status $STATUS"
fi
say "run $RUN_ID $STATUS"
SUCCESS=1
