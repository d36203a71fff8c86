#!/usr/bin/env bash
# Installs every build and test dependency from Debian 12's packages and builds
# Posthaste (release build in ./build). Run as root. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt_get() { apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 "$@"; }

pkgs=(
  # build
  gcc clang lld pkg-config meson ninja-build
  liburing-dev libssl-dev libcrypt-dev libjemalloc-dev libc-ares-dev libcmocka-dev openssl
  # sanitizer and fuzzer runtimes for clang
  libclang-rt-14-dev
  # tests: real clients and peers
  python3 python3-pytest swaks libnet-ssleay-perl libio-socket-ssl-perl curl dnsmasq-base iproute2 util-linux procps
  postfix
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  # Postfix is installed only for its test tools (smtp-sink, smtp-source);
  # "Local only" keeps it off the network, and it is not started here.
  echo "postfix postfix/main_mailer_type select Local only" | debconf-set-selections
  echo "postfix postfix/mailname string localhost" | debconf-set-selections
  apt_get update -qq
  apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -f build/build.ninja ]; then
  meson setup build --buildtype=release >/dev/null
fi
ninja -C build >/dev/null
echo "setup: built $(ls build/bench/posthaste-bench)"
