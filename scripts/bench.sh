#!/usr/bin/env bash
# Benchmarks: builds release binaries, starts the sample-game server(s), runs the load tool
# against them, stops them. Figures print to stdout; record them in BENCHMARKS.md.
#
#   scripts/bench.sh            everything below
#   scripts/bench.sh local      local echo on one standalone server (three loads)
#   scripts/bench.sh cluster    local cluster (connector + 2 room servers): forwarded echo,
#                               local echo on the connector, push fan-out to 1000 members
#   scripts/bench.sh idle [N]   idle memory with N sessions (default 19900, see BENCHMARKS.md)
#   scripts/bench.sh churn [W]  local cluster: W waves (default 40) of 500 players logging in,
#                               joining a room, switching rooms, chatting and leaving; the servers' memory per wave
#   scripts/bench.sh flood      local cluster: one client flooding room.room.say notifies, another
#                               probing with connector.entry.echo every 1 ms; the probe's latencies
#   scripts/bench.sh stalled [N] local cluster: N room members (default 500) stop reading while
#                               another says lines in their room; the servers' peak memory
#   scripts/bench.sh starved    local cluster and a second connector: 1000 members of a room on
#                               connector-2, 20 speakers on connector-1 saying lines as fast as
#                               they are answered; then again with connector-2's event loop
#                               starved of CPU (its thread at nice 19 beside two busy loops, as
#                               a frontend on an overloaded host); connector-2's memory
#   scripts/bench.sh frontends [N]  local cluster and N more connectors (default 8), no player
#                               on them: 100 members of a room and 10 speakers on connector-1
#                               (what every push to users costs with many frontends)
#   scripts/bench.sh steady     local cluster: local and forwarded echo sent at steady rates
#                               (1k to 50k requests/s over 100 connections); the servers' CPU
#   scripts/bench.sh sessions   connector + 2 room servers started with --role, all in one session
#                               and then each in a session of its own (as from three terminals):
#                               forwarded echo at two loads each
#   scripts/bench.sh rooms [N ...]  local clusters of N room servers each (default 2 8 32; not
#                               part of `all`): forwarded echo at 64 x 16, the servers' CPU
#   scripts/bench.sh rpc        local cluster: user RPC (connector.entry.rpc_echo, a connector
#                               handler calling a room server's echo remote) at 64 x 1, 64 x 16
#                               and 256 x 1, forwarded echo at 64 x 1 beside it (not part of `all`)
#   scripts/bench.sh soak [M]   local cluster for M minutes (default 5; not part of `all`): a
#                               busy room (talk: 200 members, 4 speakers) and waves of 200
#                               players coming and going (churn) at once, while every minute a
#                               room server is stopped (SIGTERM) or killed (SIGKILL), in turn,
#                               and the launcher starts it again; then the pushes heard, the
#                               players' errors, the servers' warnings and errors, their memory
#   scripts/bench.sh fuzz [S]   local cluster for S seconds (default 60; not part of `all`): 16
#                               clients sending bad input of every kind beside two calm players
#                               (dragonfruit-bench fuzz); then the servers' warnings and errors,
#                               and how many log lines a client wrote (routes with newlines)
#   scripts/bench.sh ratio [R]  local cluster: R rounds (default 6) of forwarded and local echo
#                               at 64 x 16, 5 s each, their order alternating; each round's
#                               forwarded / local, then the median, mean and range over the
#                               rounds (issue 4's target; one run of each spreads widely)
#   scripts/bench.sh restart    local cluster, idle: room-1 stopped gracefully (SIGTERM) three
#                               times (the launcher starts it again); how long each stop takes,
#                               until its process has exited (not part of `all`)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
port=3250
cargo build --release --locked -q -p sample-game -p dragonfruit-client
bench=target/release/dragonfruit-bench

. scripts/lib.sh

server_pid=""
pids=""
start() {
    RUST_LOG=warn target/release/sample-game --tcp "127.0.0.1:$port" "$@" >/tmp/dragonfruit-bench-server.log 2>&1 &
    server_pid=$!
    wait_port "$port"
    if [ "$*" = "--role standalone" ]; then
        pids=$server_pid
    else
        sleep 1.5  # let the connector discover the room servers
        pids=$(pgrep -d, -P "$server_pid")
    fi
}
# Starts one more connector, id $1 on port $2, in the cluster `start` started ($! is its pid).
extra_connector() {
    RUST_LOG=warn target/release/sample-game --role connector --id "$1" --tcp "127.0.0.1:$2" \
        --discovery-dir "/tmp/dragonfruit-sample-game-$server_pid" >>/tmp/dragonfruit-bench-server.log 2>&1 &
}
# The servers' warnings and errors: alike lines counted together (numbers made N), the
# first 20 kinds.
logged() {
    echo "== servers' warnings and errors (sample-game log)"
    warning_kinds /tmp/dragonfruit-bench-server.log 160 20
}
# The pid of the launcher's child serving server id $1 (none: empty).
child_pid() {
    pgrep -P "$server_pid" -f -- "--id $1 " | head -1 || true
}
stop() {
    if [ -n "$server_pid" ]; then kill -INT "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    server_pid=""
}
trap stop EXIT

if [ "$what" = all ] || [ "$what" = local ]; then
    start --role standalone
    $bench echo --connections 64 --inflight 16 --duration 10 --warmup 2 --threads 1 --server-pid "$pids"
    $bench echo --connections 64 --inflight 16 --duration 10 --warmup 2 --threads 2 --server-pid "$pids"
    $bench echo --connections 50 --inflight 8 --duration 10 --warmup 2 --threads 1 --server-pid "$pids"
    stop
fi
if [ "$what" = all ] || [ "$what" = cluster ]; then
    start
    $bench echo --route room.room.echo --connections 64 --inflight 16 --duration 10 --warmup 2 --server-pid "$pids"
    $bench echo --route connector.entry.echo --connections 64 --inflight 16 --duration 10 --warmup 2 --server-pid "$pids"
    $bench fanout --connections 1000 --rounds 20 --server-pid "$pids"
    stop
fi
if [ "$what" = rpc ]; then
    start
    for load in "64 1" "64 16" "256 1"; do
        set -- $load
        echo "== user rpc, $1 connections x $2 in flight"
        $bench echo --route connector.entry.rpc_echo --connections "$1" --inflight "$2" --duration 10 --warmup 2 --server-pid "$pids"
    done
    echo "== forwarded echo, 64 connections x 1 in flight"
    $bench echo --route room.room.echo --connections 64 --inflight 1 --duration 10 --warmup 2 --server-pid "$pids"
    stop
fi
if [ "$what" = all ] || [ "$what" = churn ]; then
    start
    $bench churn --connections 500 --rounds "${2:-40}" --server-pid "$pids"
    stop
fi
if [ "$what" = all ] || [ "$what" = flood ]; then
    start
    $bench flood --duration 10 --warmup 1 --server-pid "$pids"
    stop
fi
if [ "$what" = all ] || [ "$what" = stalled ]; then
    start
    $bench stalled --connections "${2:-500}" --duration 30 --server-pid "$pids"
    stop
fi
if [ "$what" = all ] || [ "$what" = starved ]; then
    start
    extra_connector connector-2 3251
    c2=$!
    hogs=""
    trap 'kill $hogs 2>/dev/null || true; kill -INT $c2 2>/dev/null || true; stop' EXIT
    wait_port 3251
    sleep 1.5  # let connector-2 discover the room servers
    echo "== connector-2 as the others"
    $bench talk --members-addr 127.0.0.1:3251 --duration 10 --server-pid "$c2"
    echo "== connector-2's event loop at nice 19 beside two busy loops"
    renice -n 19 -p "$(grep -l '^df-loop$' /proc/"$c2"/task/*/comm | cut -d/ -f5)" >/dev/null
    for _ in 1 2; do
        bash -c 'while :; do :; done' &
        hogs="$hogs $!"
    done
    $bench talk --members-addr 127.0.0.1:3251 --duration 20 --server-pid "$c2" || true
    kill $hogs
    hogs=""
    kill -INT "$c2"; wait "$c2" || true
    trap stop EXIT
    stop
fi
if [ "$what" = all ] || [ "$what" = frontends ]; then
    start
    extra=""
    trap 'kill -INT $extra 2>/dev/null || true; stop' EXIT
    for i in $(seq 2 $((${2:-8} + 1))); do
        extra_connector "connector-$i" "$((port + i))"
        extra="$extra $!"
        wait_port "$((port + i))"
    done
    sleep 1.5  # let the servers discover each other
    $bench talk --connections 100 --speakers 10 --duration 10 --server-pid "$pids"
    kill -INT $extra; wait $extra || true
    trap stop EXIT
    stop
fi
if [ "$what" = all ] || [ "$what" = steady ]; then
    start
    for route in connector.entry.echo room.room.echo; do
        for rate in 1000 5000 10000 50000; do
            $bench echo --route "$route" --connections 100 --rate "$rate" --duration 10 --warmup 2 --server-pid "$pids"
        done
    done
    stop
fi
if [ "$what" = all ] || [ "$what" = sessions ]; then
    # The three servers with --role, found through a fresh embedded discovery directory.
    dir=$(mktemp -d)
    ours="^target/release/sample-game --role .* --discovery-dir $dir"
    trap 'pkill -INT -f "$ours" || true; rm -rf "$dir"; stop' EXIT
    serve() {
        local role=$1 id=$2
        shift 2
        echo "target/release/sample-game --role $role --id $id --discovery-dir $dir $* >>/tmp/dragonfruit-bench-server.log 2>&1"
    }
    servers=("$(serve connector connector-1 --tcp "127.0.0.1:$port")" "$(serve room room-1)" "$(serve room room-2)")
    run_forwarded() {
        wait_port
        for _ in $(seq 100); do
            [ "$(pgrep -c -f "$ours")" = 3 ] && break
            sleep 0.1
        done
        pids=$(pgrep -d, -f "$ours")
        sleep 1.5  # let the connector discover the room servers
        for load in "64 16" "16 4"; do
            set -- $load
            $bench echo --route room.room.echo --connections "$1" --inflight "$2" --duration 10 --warmup 2 --server-pid "$pids"
        done
        pkill -INT -f "$ours" || true
        for _ in $(seq 100); do
            pgrep -f "$ours" >/dev/null || break
            sleep 0.1
        done
    }
    export RUST_LOG=warn
    echo "== one session for the three servers"
    setsid bash -c "${servers[0]} & ${servers[1]} & ${servers[2]} & wait" &
    run_forwarded
    echo "== a session for each server"
    for cmd in "${servers[@]}"; do setsid bash -c "exec $cmd" & done
    run_forwarded
fi
if [ "$what" = rooms ]; then
    shift
    for rooms in ${*:-2 8 32}; do
        echo "== $rooms room servers"
        start --rooms "$rooms"
        $bench echo --route room.room.echo --connections 64 --inflight 16 --duration 10 --warmup 2 --server-pid "$pids"
        stop
    done
fi
if [ "$what" = all ] || [ "$what" = idle ]; then
    # A standalone server has no cluster to keep file descriptors for: 64 are plenty, so
    # 19,900 clients fit under an open-file limit of 20,000 (connection.reserved_files).
    DRAGONFRUIT_CONNECTION__RESERVED_FILES=64 start --role standalone
    $bench idle --connections "${2:-19900}" --hold 10 --server-pid "$pids"
    stop
fi
if [ "$what" = soak ]; then
    minutes="${2:-5}"
    start
    end=$((SECONDS + minutes * 60))
    out=/tmp/dragonfruit-soak
    rm -rf "$out" && mkdir -p "$out"
    $bench talk --connections 200 --speakers 4 --duration $((minutes * 60)) --warmup 1 >"$out/talk.txt" 2>&1 &
    talk=$!
    (
        while [ "$SECONDS" -lt "$end" ]; do
            $bench churn --connections 200 --rounds 5 >>"$out/churn.txt" 2>&1 || true
        done
    ) &
    churn=$!
    trap 'kill $talk $churn 2>/dev/null || true; stop' EXIT
    n=0
    while [ $((SECONDS + 60)) -le "$end" ]; do
        sleep 60
        n=$((n + 1))
        id=room-$(( (n - 1) % 2 + 1 ))
        signal=$([ $((n % 2)) -eq 1 ] && echo TERM || echo KILL)
        pid=$(child_pid "$id")
        if [ -z "$pid" ]; then echo "$(date +%T) $id is not running"; continue; fi
        echo "$(date +%T) SIG$signal $id (pid $pid)"
        kill -"$signal" "$pid" || true
    done
    wait "$talk" || true
    wait "$churn" || true
    echo "== talk (one room, its members on the connector)"
    talk_summary "$out/talk.txt"
    echo "== churn"
    awk '/players total/ { players += $3 } /errors at/ { errors += $1; if (!first) first = $0 }
        END { printf "  players %d, failed %d\n", players, errors; if (first) print "  first failure:" first }' "$out/churn.txt"
    logged
    echo "== servers' memory now"
    for pid in $(pgrep -P "$server_pid"); do
        echo "  $(tr '\0' ' ' <"/proc/$pid/cmdline" | grep -o -- '--id [^ ]*')  $(awk '/VmRSS/ {print $2, $3}' "/proc/$pid/status")"
    done
    stop
fi
if [ "$what" = fuzz ]; then
    start
    $bench fuzz --duration "${2:-60}" --server-pid "$pids" || true
    logged
    # Routes with a newline and `forged by a client` after it: refused, never logged raw.
    echo "== log lines written by a client: $(grep -c '^forged by a client' /tmp/dragonfruit-bench-server.log || true)"
    stop
fi
if [ "$what" = ratio ]; then
    start
    rate() {
        $bench echo --route "$1" --connections 64 --inflight 16 --duration 5 --warmup 1 --server-pid "$pids" \
            | awk '/requests\/s/ { print $2 }'
    }
    ratios=""
    for round in $(seq "${2:-6}"); do
        if [ $((round % 2)) = 1 ]; then
            forwarded=$(rate room.room.echo); loc=$(rate connector.entry.echo)
        else
            loc=$(rate connector.entry.echo); forwarded=$(rate room.room.echo)
        fi
        ratio=$(awk -v f="$forwarded" -v l="$loc" 'BEGIN { printf "%.1f", 100 * f / l }')
        echo "round $round: forwarded $forwarded req/s, local $loc req/s, $ratio%"
        ratios="$ratios $ratio"
    done
    echo "$ratios" | tr ' ' '\n' | sed '/^$/d' | sort -n | awk '{ a[NR] = $1; s += $1 } END {
        m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
        printf "forwarded / local over %d rounds: median %.1f%%, mean %.1f%%, from %.1f%% to %.1f%%\n", NR, m, s / NR, a[1], a[NR] }'
    stop
fi
if [ "$what" = restart ]; then
    start
    for _ in 1 2 3; do
        room=$(child_pid room-1)
        t0=$(date +%s%N)
        kill -TERM "$room"
        # Exited: gone, or a zombie until the launcher reaps it.
        while [ -e "/proc/$room" ] && ! grep -q '^[0-9]* (.*) Z' "/proc/$room/stat" 2>/dev/null; do sleep 0.005; done
        echo "room-1 graceful stop: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
        sleep 3
    done
    stop
fi
