#!/usr/bin/env bash
# Benchmarks: builds release binaries, starts the sample-game server, runs the load tool
# against it, stops it. Figures print to stdout; record them in BENCHMARKS.md.
#
#   scripts/bench.sh            local echo (1 and 2 client threads) + idle memory
#   scripts/bench.sh echo       local echo only
#   scripts/bench.sh idle [N]   idle memory with N sessions (default 19900, see BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
port=3250
cargo build --release --locked -q -p sample-game -p dragonfruit-client
bench=target/release/dragonfruit-bench

server_pid=""
start_server() {
    RUST_LOG=warn target/release/sample-game --tcp "127.0.0.1:$port" >/tmp/dragonfruit-bench-server.log 2>&1 &
    server_pid=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return; fi
        sleep 0.05
    done
    echo "server did not start" >&2; exit 1
}
stop_server() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    server_pid=""
}
trap stop_server EXIT

if [ "$what" = all ] || [ "$what" = echo ]; then
    start_server
    $bench echo --connections 64 --inflight 16 --duration 10 --warmup 2 --threads 1 --server-pid "$server_pid"
    $bench echo --connections 64 --inflight 16 --duration 10 --warmup 2 --threads 2 --server-pid "$server_pid"
    $bench echo --connections 50 --inflight 8 --duration 10 --warmup 2 --threads 1 --server-pid "$server_pid"
    stop_server
fi
if [ "$what" = all ] || [ "$what" = idle ]; then
    start_server
    $bench idle --connections "${2:-19900}" --hold 10 --server-pid "$server_pid"
    stop_server
fi
