#!/usr/bin/env bash
# Installs what the benchmark harnesses need beyond the Rust toolchain:
# - redis-server (Debian package `redis-server`): the reference of `ops`
#   (cargo run --release -p grid-bench --bin ops), started by the bench itself on loopback.
# Idempotent: does nothing when redis-server is already on PATH. Needs root (apt-get);
# without root it only says what is missing.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "missing: redis-server (install with: sudo apt-get install -y redis-server); ops will skip the redis reference" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq redis-server
# The package starts a system instance on 6379 where systemd runs; the bench does not use it
# (it starts its own on a free loopback port).
command -v redis-server >/dev/null 2>&1
