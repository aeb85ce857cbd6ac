#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine.
#
# Installs what the tests need when it is missing (Debian packages with apt-get: node/npm,
# g++, etcd-server; the npm packages of tests/node with `npm ci`), then runs `cargo test` for
# the whole workspace. Servers the tests need (dragonfruit servers, etcd) are started and
# stopped by the tests themselves on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_missing=()
command -v node >/dev/null 2>&1 || apt_missing+=(nodejs)
command -v npm >/dev/null 2>&1 || apt_missing+=(npm)
command -v g++ >/dev/null 2>&1 || apt_missing+=(g++)  # zmq builds its bundled libzmq
command -v etcd >/dev/null 2>&1 || apt_missing+=(etcd-server)  # etcd discovery tests run a real etcd
if [ "${#apt_missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${apt_missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}"
fi

if [ ! -d tests/node/node_modules/pomelo-protocol ]; then
    log "installing npm packages for the third-party client tests"
    (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
fi

log "cargo test --workspace"
cargo test --workspace --locked "$@"
