#!/usr/bin/env bash
# The main job: the posthaste daemon on its embedded default configuration
# (SMTP on 127.0.0.1:2525, spool in ./var/spool, fsync before every 250),
# a short load through it with posthaste-bench send, and the figures; then the
# same sender against the discarding posthaste-bench sink.
# Delivery is not built yet, so the daemon runs with its benchmark route
# (--discard): each message is made durable, acknowledged, then dropped, and
# the spool does not grow from one demo to the next.
set -euo pipefail
cd "$(dirname "$0")/.."
bench=build/bench/posthaste-bench
daemon=build/mta/posthaste/posthaste
[ -x "$bench" ] && [ -x "$daemon" ] || { echo "demo: run tools/setup.sh first" >&2; exit 1; }
messages=${MESSAGES:-50000}
log=$(mktemp)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -f "$log"; }
trap cleanup EXIT

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "demo: nothing listens on 127.0.0.1:$1" >&2
  return 1
}

echo "== posthaste (embedded defaults + --discard): spool $(pwd)/var/spool, durability fsync"
"$daemon" --discard 2>"$log" &
pids+=($!)
wait_port 2525
"$bench" send --server 127.0.0.1:2525 --connections 50 --messages "$messages" --size 1024
kill -TERM "${pids[0]}"
wait "${pids[0]}" || true
grep -E "listening|workers|stopped" "$log" | sed 's/^/   /'

echo
echo "== posthaste-bench sink on 127.0.0.1:2526 (discards at once, no disk)"
"$bench" sink --listen 127.0.0.1:2526 --quiet >"$log" &
pids+=($!)
wait_port 2526
"$bench" send --server 127.0.0.1:2526 --connections 50 --messages $((messages * 4)) --size 1024
kill -TERM "${pids[1]}"
wait "${pids[1]}" || true
echo "   sink counted: $(cat "$log")"
