#!/usr/bin/env bash
# Runs every test and ends with one line "N passed, N failed":
#   1. release build: unit tests (cmocka)
#   2. ASan+UBSan build (no jemalloc): unit tests
#   3. integration tests (pytest driving real clients and peers) against both
#      builds, inside a fresh network namespace (unshare -n; only loopback)
#   4. libFuzzer targets, FUZZ_SECONDS each (default 60)
# Run tools/setup.sh first (as root) on a fresh machine.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
out=$root/build-test-results
rm -rf "$out"
mkdir -p "$out"
passed=0 failed=0 skipped=0

add() { # passed failed skipped label
  passed=$((passed + $1)); failed=$((failed + $2)); skipped=$((skipped + $3))
  echo "== $4: $1 passed, $2 failed, $3 skipped"
}

step_fail() { add 0 1 0 "$1 (could not run)"; }

run_meson_tests() { # builddir label
  local b=$1 label=$2
  # engine tests bind loopback ports: run them in a fresh network namespace too
  unshare -n sh -c 'ip link set lo up && exec meson test "$@"' sh -C "$b" --suite unit \
    --print-errorlogs --num-processes 2 >"$out/$label.log" 2>&1
  tail -n 12 "$out/$label.log"
  read -r p f s < <(/usr/bin/python3 tools/count_results.py meson "$b/meson-logs/testlog.json")
  add "$p" "$f" "$s" "$label"
}

run_integration() { # builddir label
  local b=$1 label=$2
  if ! command -v unshare >/dev/null || ! unshare -n true 2>/dev/null; then
    echo "== $label: cannot create a network namespace (unshare -n); integration tests need root"
    step_fail "$label"
    return
  fi
  POSTHASTE_BUILD="$root/$b" unshare -n sh -c 'ip link set lo up && exec /usr/bin/python3 -m pytest -q -p no:cacheprovider "$@"' \
    sh tests/integration --junitxml="$out/$label.xml" 2>&1 | tail -n 25
  read -r p f s < <(/usr/bin/python3 tools/count_results.py junit "$out/$label.xml")
  add "$p" "$f" "$s" "$label"
}

# 1. release
if meson setup build --buildtype=release >/dev/null 2>&1 || [ -f build/build.ninja ]; then
  if ninja -C build >"$out/build.log" 2>&1; then
    run_meson_tests build unit
  else
    tail -n 30 "$out/build.log"; step_fail "release build"
  fi
else
  step_fail "release configure"
fi

# 2. ASan + UBSan
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:halt_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
if [ -f build-asan/build.ninja ] || meson setup build-asan --buildtype=debugoptimized \
     -Db_sanitize=address,undefined -Db_lundef=false -Djemalloc=disabled >/dev/null 2>&1; then
  if ninja -C build-asan >"$out/build-asan.log" 2>&1; then
    run_meson_tests build-asan unit-asan
  else
    tail -n 30 "$out/build-asan.log"; step_fail "sanitizer build"
  fi
else
  step_fail "sanitizer configure"
fi

# 3. integration, against the release and the sanitizer builds
[ -x build/bench/posthaste-bench ] && run_integration build integration
[ -x build-asan/bench/posthaste-bench ] && run_integration build-asan integration-asan

# 4. fuzzing
if command -v clang >/dev/null; then
  if [ -f build-fuzz/build.ninja ] || CC=clang meson setup build-fuzz --buildtype=debugoptimized \
       -Dfuzz=true -Dtests=false -Djemalloc=disabled >/dev/null 2>&1; then
    if ninja -C build-fuzz >"$out/build-fuzz.log" 2>&1; then
      for fz in build-fuzz/tests/fuzz/fuzz_*; do
        [ -f "$fz" ] && [ -x "$fz" ] || continue
        name=$(basename "$fz"); short=${name#fuzz_}
        corpus=$(mktemp -d)
        [ -d "tests/fuzz/corpus/$short" ] && cp -r "tests/fuzz/corpus/$short/." "$corpus/"
        dict=(); [ -f "tests/fuzz/$short.dict" ] && dict=(-dict="tests/fuzz/$short.dict")
        if "$fz" "${dict[@]}" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
             -artifact_prefix="$out/$name-" "$corpus" >"$out/$name.log" 2>&1; then
          add 1 0 0 "fuzz $name (${FUZZ_SECONDS}s, $(grep -o 'stat::number_of_executed_units: [0-9]*' "$out/$name.log" | grep -o '[0-9]*$' || echo '?') runs)"
        else
          tail -n 30 "$out/$name.log"; add 0 1 0 "fuzz $name"
        fi
        rm -rf "$corpus"
      done
    else
      tail -n 30 "$out/build-fuzz.log"; step_fail "fuzz build"
    fi
  else
    step_fail "fuzz configure"
  fi
else
  step_fail "fuzz (no clang)"
fi

echo
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
