#!/usr/bin/env bash
# The main job: the posthaste relay on its embedded default configuration
# (SMTP on 127.0.0.1:2525, spool in ./var/spool, fsync before every 250, the
# accounting log in ./var/log/accounting.jsonl) plus one route, demo.test ->
# a posthaste-bench sink on 127.0.0.1:2526 standing in for the destination's
# MX. A short load goes in with posthaste-bench send; the relay delivers every
# message to the sink; the figures in and out are printed.
# Everything stays on loopback and no DNS is asked (the route names an address).
set -euo pipefail
cd "$(dirname "$0")/.."
bench=build/bench/posthaste-bench
daemon=build/mta/posthaste/posthaste
[ -x "$bench" ] && [ -x "$daemon" ] || { echo "demo: run tools/setup.sh first" >&2; exit 1; }
messages=${MESSAGES:-20000}
log=$(mktemp)
sinklog=$(mktemp)
acct=var/log/accounting.jsonl
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -f "$log" "$sinklog"
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "demo: nothing listens on 127.0.0.1:$1" >&2
  return 1
}

now_ms() { date +%s%3N; }

count_delivered() { [ -f "$acct" ] && grep -c '"event":"delivery"' "$acct" || echo 0; }

echo "== posthaste-bench sink on 127.0.0.1:2526: the destination (MX) for demo.test"
"$bench" sink --listen 127.0.0.1:2526 --quiet >"$sinklog" &
pids+=($!)
wait_port 2526

mkdir -p var/log
before=$(count_delivered)
echo "== posthaste on 127.0.0.1:2525 (embedded defaults + --route demo.test=[127.0.0.1]:2526)"
"$daemon" --route 'demo.test=[127.0.0.1]:2526' 2>"$log" &
pids+=($!)
wait_port 2525

echo "== sending $messages messages of 1 KiB over 50 connections to user@demo.test"
t0=$(now_ms)
"$bench" send --server 127.0.0.1:2525 --connections 50 --messages "$messages" --size 1024 \
  --to user@demo.test
t1=$(now_ms)

# delivery runs alongside the reception; wait (bounded) for the rest
deadline=$((t1 + 120000))
while :; do
  done_n=$(( $(count_delivered) - before ))
  [ "$done_n" -ge "$messages" ] && break
  [ "$(now_ms)" -ge "$deadline" ] && { echo "demo: only $done_n of $messages delivered after 120 s" >&2; break; }
  sleep 0.2
done
t2=$(now_ms)
kill -TERM "${pids[1]}"
wait "${pids[1]}" || true
kill -TERM "${pids[0]}"
wait "${pids[0]}" || true

in_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1000 }')
all_s=$(awk -v a="$t0" -v b="$t2" 'BEGIN { printf "%.2f", (b - a) / 1000 }')
echo
echo "== what happened"
echo "   accepted (250, durable):  $messages in ${in_s} s = $(awk -v n="$messages" -v s="$in_s" 'BEGIN { printf "%.0f", n / s }') msgs/s in"
echo "   delivered to the sink:    ${done_n} (all done ${all_s} s after the first message) = $(awk -v n="$done_n" -v s="$all_s" 'BEGIN { printf "%.0f", n / s }') msgs/s out"
echo "   sink counted:             $(cat "$sinklog")"
echo "   spool:                    $(pwd)/var/spool"
echo "   accounting log:           $(pwd)/$acct ($(wc -l <"$acct") lines; e.g. the last one:)"
tail -n 1 "$acct" | sed 's/^/     /'
echo "   daemon log:"
grep -E "listening|workers|recovered|stopped|delivery:" "$log" | sed 's/^/     /'
