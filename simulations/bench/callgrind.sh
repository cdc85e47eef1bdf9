#!/usr/bin/env bash
# callgrind.sh OUT EDGE SIM: the edge under callgrind, each thread apart, while 8 clients run
# the till cycle for 20 s; prints the durable writes and each thread's instruction total
# (the runtime worker and the writer are the two largest). Divide by the writes.
set -u
. "$(dirname "$0")/lib.sh"
OUT=$1; EDGE=$2; SIM=$3
D=$(mktemp -d /tmp/outpost-cg-XXXX); rm -rf "$OUT"; mkdir -p "$OUT"
PORT=${PORT:-9312}
valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$OUT/cg.out.%p" \
  "$EDGE" serve --data-dir "$D" --branch B001 --http 127.0.0.1:$PORT > "$OUT/edge.log" 2>&1 &
PID=$!
wait_for_edge "$D" $PORT || { kill $PID; exit 1; }
"$SIM" load --url http://127.0.0.1:$PORT --token "$(cat "$D/admin.token")" --clients 8 --seconds 20 > "$OUT/load.txt" 2>&1
kill $PID; wait $PID
grep "durable writes" "$OUT/load.txt"
for f in "$OUT"/cg.out.*-*; do echo "$f $(grep -m1 '^summary:' "$f")"; done
rm -rf "$D"
