#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain:
# - iproute2 (`ip`) and util-linux (`unshare`): the multicast test runs inside a network
#   namespace it creates.
# Needs root (apt-get); without root it only says what is missing.
set -euo pipefail

missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "missing: ${missing[*]} (install with: sudo apt-get install -y ${missing[*]}); namespace tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}"
