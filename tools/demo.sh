#!/usr/bin/env bash
# The main job until the relay lands: a discarding SMTP sink, a short load
# through it with posthaste-bench send, and the figures of both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
bench=build/bench/posthaste-bench
[ -x "$bench" ] || { echo "demo: run tools/setup.sh first" >&2; exit 1; }

port=${PORT:-2525}
messages=${MESSAGES:-200000}
"$bench" sink --listen "127.0.0.1:$port" --quiet > /tmp/posthaste-demo-sink.json &
sink=$!
trap 'kill "$sink" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

echo "== posthaste-bench send: $messages messages of 1 KiB over 50 connections to 127.0.0.1:$port"
"$bench" send --server "127.0.0.1:$port" --connections 50 --messages "$messages" --size 1024

kill -TERM "$sink"
wait "$sink" || true
trap - EXIT
echo "== posthaste-bench sink counted:"
cat /tmp/posthaste-demo-sink.json
