#!/usr/bin/env bash
# Installs what the benchmark harnesses need beyond the Rust toolchain (Debian packages):
# - redis-server: the reference of `ops` and `locks`
#   (cargo run --release -p grid-bench --bin ops), started by the bench itself on loopback;
# - etcd-server: the etcd reference of `locks`, started by the bench itself on loopback;
# - protobuf-compiler (`protoc`): needed to build the bench's etcd client
#   (cargo run --release -p grid-bench --bin locks --features etcd).
# Idempotent: installs only what is missing. Needs root (apt-get); without root it only
# says what is missing.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "missing: ${missing[*]} (install with: sudo apt-get install -y ${missing[*]}); the benches skip the references that are missing" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}"
# The packages start system instances where systemd runs (redis on 6379, etcd on 2379); the
# benches do not use them (they start their own on free loopback ports).
command -v redis-server >/dev/null 2>&1
command -v etcd >/dev/null 2>&1
command -v protoc >/dev/null 2>&1
