#!/usr/bin/env bash
# ab-rounds.sh N EDGE_A EDGE_B SIM LOAD-ARGS...: N alternating rounds of two edge builds under
# the same load generator; one line per run: writes/s, request and feed latency, encodes per
# commit, errors, the edge's CPU per durable write, the load average.
set -u
N=$1; A=$2; B=$3; SIM=$4; shift 4
HERE=$(dirname "$0")
TICK_US=$((1000000 / $(getconf CLK_TCK)))
for r in $(seq 1 "$N"); do
  for edge in "$A" "$B"; do
    out=$("$HERE/edge-run.sh" "$edge" "$SIM" "$@")
    n=$(echo "$out" | awk '/durable writes/ {print $3}')
    t=$(echo "$out" | awk '/edge cpu ticks/ {print $4}')
    echo "$r $edge | $(echo "$out" | grep 'durable writes' | sed 's/.*= //')" \
      "| req $(echo "$out" | grep 'request latency' | sed 's/request latency ms *//')" \
      "| feed $(echo "$out" | grep 'feed delivery' | sed 's/feed delivery ms *//')" \
      "| enc $(echo "$out" | grep 'encodes' | sed 's/feed encodes.commit *//')" \
      "| err $(echo "$out" | grep '^errors' | sed 's/errors *//')" \
      "| cpu us/write $(awk -v t="$t" -v n="$n" -v u="$TICK_US" 'BEGIN{printf "%.1f", t*u/n}')" \
      "| load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
