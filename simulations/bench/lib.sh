# Sourced by the bench scripts.

# wait_for_edge DATA_DIR PORT: until the edge has written its admin token and answers
# /healthz (at most ~60 s: under valgrind it starts slowly).
wait_for_edge() {
  for _ in $(seq 1 1200); do
    [ -f "$1/admin.token" ] && curl -s -o /dev/null "http://127.0.0.1:$2/healthz" && return 0
    sleep 0.05
  done
  echo "the edge did not come up on port $2" >&2
  return 1
}
