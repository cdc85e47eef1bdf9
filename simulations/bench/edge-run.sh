#!/usr/bin/env bash
# edge-run.sh EDGE SIM LOAD-ARGS...: one standalone `outpost-edge serve` on a fresh data dir,
# one `outpost-sim load --url` run against it. Prints the load report and the edge's CPU time
# over the run ("edge cpu ticks N", user + system, in clock ticks).
set -u
. "$(dirname "$0")/lib.sh"
EDGE=$1; SIM=$2; shift 2
D=$(mktemp -d /tmp/outpost-bench-XXXX)
PORT=${PORT:-9311}
"$EDGE" serve --data-dir "$D" --branch B001 --http 127.0.0.1:$PORT > "$D/edge.log" 2>&1 &
PID=$!
wait_for_edge "$D" $PORT || { kill $PID; exit 1; }
T0=$(awk '{print $14+$15}' /proc/$PID/stat)
"$SIM" load --url http://127.0.0.1:$PORT --token "$(cat "$D/admin.token")" "$@" 2>&1
T1=$(awk '{print $14+$15}' /proc/$PID/stat)
echo "edge cpu ticks $((T1 - T0))"
kill $PID; wait $PID 2>/dev/null
rm -rf "$D"
