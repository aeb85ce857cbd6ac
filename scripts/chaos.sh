#!/usr/bin/env bash
# Chaos run: failures of every kind the cluster tests make one at a time, made at random and
# overlapping, on a cluster found through a real etcd, with players on it throughout.
#
#   scripts/chaos.sh [MINUTES] [SEED]      (defaults: 10 minutes, a random seed, printed)
#   DISCOVERY=embedded scripts/chaos.sh ...  the same on embedded discovery (no etcd; the
#                                            etcd events are room server events instead)
#   NETWORK=1 scripts/chaos.sh ...           also network faults (etcd discovery; root): the
#                                            run is made in a network namespace of its own,
#                                            on its loopback, with iptables (installed if
#                                            missing) cutting connections and losing packets
#
# Starts etcd (a temporary data directory, loopback ports), two connectors (127.0.0.1:3250
# and :3251) and three room servers of the sample game with etcd discovery. Players: a busy
# room (200 members and 4 speakers on connector-1, `dragonfruit-bench talk`) and waves of
# 100 players coming and going on each connector (`dragonfruit-bench churn`, run again
# whenever it ends). Every 15 s one event, chosen by the seed: a room server killed
# (SIGKILL) or stopped (SIGTERM) and started again, a room server frozen (SIGSTOP) for 2 s
# or for 6 s (past `discovery.ttl` and the RPC heartbeats), connector-2 stopped or killed
# and started again, etcd killed for 8 s, or etcd frozen for 6 s. With NETWORK=1 also, for
# 8 s (CUT_SECONDS): a room server cut off (from every server and etcd), connector-2 cut
# off from the servers and etcd (its players' connections stay), connector-1 and a room
# server cut from each other (both still reach etcd and the rest), connector-1 unable to
# call a room server (which still calls it), or the reverse, a room server cut from etcd
# only; or 5% of all packets lost for 15 s (players' too). Each party runs as a user of
# its own (etcd uid 40000, the servers 40001-40005), so its connections are told apart
# (conntrack marks). Events overlap: one may start while an earlier freeze or outage
# lasts. EVENTS="12 13 ..." makes those events (numbered as in the `case` below) in turn
# instead of random ones.
#
# At the end, once the failures have stopped for 10 s: every server must still run, discovery
# must list the five, forwarded echo from each connector must answer every request, and
# every server must stop on SIGTERM with exit status 0. Then it prints the events, the
# players' failures (with the time of each wave's first), each server's warnings and
# errors by kind, panics, and the servers' memory. Output and logs: /tmp/dragonfruit-chaos.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
minutes="${1:-10}"
seed="${2:-$((RANDOM * 32768 + RANDOM))}"
RANDOM=$seed
network="${NETWORK:-0}"
if [ "$network" = 1 ] && [ "${DISCOVERY:-etcd}" != etcd ]; then echo "NETWORK=1 needs etcd discovery" >&2; exit 2; fi
# Built once, not again by the run inside the network namespace.
[ -n "${CHAOS_NETNS:-}" ] || cargo build --release --locked -q -p sample-game -p dragonfruit-client
if [ "$network" = 1 ] && [ -z "${CHAOS_NETNS:-}" ]; then
    if ! command -v iptables >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q iptables >/dev/null
    fi
    ns="dragonfruit-chaos-$$"
    ip netns add "$ns"
    trap 'ip netns del "$ns"' EXIT
    ip netns exec "$ns" ip link set lo up
    status=0
    ip netns exec "$ns" env CHAOS_NETNS="$ns" scripts/chaos.sh "$minutes" "$seed" || status=$?
    exit "$status"
fi
echo "chaos: $minutes min, seed $seed${CHAOS_NETNS:+, network faults (namespace $CHAOS_NETNS)}"
bench=target/release/dragonfruit-bench
game=target/release/sample-game
out=/tmp/dragonfruit-chaos
rm -rf "$out" && mkdir -p "$out"

# A free port below the kernel's range for outgoing connections' local ports, so none of
# those takes it while its server is down (etcd or a server restarting binds it again).
ephemeral=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
[ "$ephemeral" -gt 13000 ] || ephemeral=13000
free_port() {
    local p
    while :; do
        p=$((ephemeral - 12000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
}
event() { echo "$(date +%T.%3N) $*" | tee -a "$out/events.txt"; }

discovery="${DISCOVERY:-etcd}"
case $discovery in etcd | embedded) ;; *) echo "DISCOVERY must be etcd or embedded" >&2; exit 2 ;; esac
etcd_client=$(free_port)
etcd_peer=$(free_port)
etcd_url="http://127.0.0.1:$etcd_client"
etcd_pid=""
etcd_start() {
    mkdir -p "$out/etcd-data" && chmod 700 "$out/etcd-data"
    [ "$network" = 1 ] && chown "${uid[etcd]}:${uid[etcd]}" "$out/etcd-data"
    as_party etcd etcd --name chaos --data-dir "$out/etcd-data" \
        --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "chaos=http://127.0.0.1:$etcd_peer" --logger zap --log-level warn \
        >>"$out/etcd.log" 2>&1 &
    etcd_pid=$!
    wait_port "$etcd_client" 15
}

declare -A pid tcp rpc
tcp[connector-1]=127.0.0.1:3250
tcp[connector-2]=127.0.0.1:3251
servers="connector-1 connector-2 room-1 room-2 room-3"
# Fixed RPC ports (a restarted server binds its own again), none taken twice.
while :; do
    for id in $servers; do rpc[$id]=$(free_port); done
    [ "$(printf '%s\n' "$etcd_client" "$etcd_peer" "${rpc[@]}" | sort -u | wc -l)" = 7 ] && break
done
# With network faults, each party's user id (etcd 40000, the servers 40001-40005) and the
# conntrack mark bit its connections get once it has sent on them: a connection between
# two parties holds both their bits.
declare -A uid bit
n=0
for id in etcd $servers; do
    uid[$id]=$((40000 + n)); bit[$id]=$((1 << n)); n=$((n + 1))
    if [ "$network" = 1 ]; then
        iptables -A OUTPUT -m owner --uid-owner "${uid[$id]}" -j CONNMARK --set-mark "${bit[$id]}/${bit[$id]}"
    fi
done
# Runs (execs: started with `&`, its pid is the program's) "${@:2}" as party $1.
as_party() {
    if [ "$network" = 1 ]; then exec setpriv --reuid="${uid[$1]}" --regid="${uid[$1]}" --clear-groups "${@:2}"; fi
    exec "${@:2}"
}
server_start() {
    local id=$1 role=${1%-*}
    local args=(--role "$role" --id "$id")
    if [ "$discovery" = etcd ]; then
        args+=(--discovery etcd --etcd-url "$etcd_url")
    else
        args+=(--discovery embedded --discovery-dir "$out/registry")
    fi
    [ "$role" = connector ] && args+=(--tcp "${tcp[$id]}")
    as_party "$id" env RUST_LOG=info DRAGONFRUIT_RPC__BIND="tcp://127.0.0.1:${rpc[$id]}" "$game" "${args[@]}" \
        >>"$out/$id.log" 2>&1 &
    pid[$id]=$!
}
# Stops server $1 with signal $2 and waits for its exit; its status goes to the event log.
server_stop() {
    local status=0
    kill -"$2" "${pid[$1]}" 2>/dev/null || true
    wait "${pid[$1]}" 2>/dev/null || status=$?
    event "  $1 exited with status $status"
}

# Network faults: rules in chains of their own (cut-N-in from INPUT, cut-N-out from OUTPUT),
# removed when the fault ends. `cut_off NAME SECONDS ID`: the connections between server
# ID and every other party dropped, and new ones of ID's (but to itself and its players).
# `cut_between NAME SECONDS ID ID [PORT]`: those between the two (only those to PORT, one's
# RPC port: the other cannot call it, it still calls the other). `lose NAME SECONDS`: 5%
# of all packets.
cuts=0
net_fault() {
    local name=$1 seconds=$2
    cuts=$((cuts + 1))
    chain="cut-$cuts"
    event "$name"
    iptables -N "$chain-in"; iptables -N "$chain-out"
    iptables -I INPUT -j "$chain-in"; iptables -A OUTPUT -j "$chain-out"
    (
        sleep "$seconds"
        iptables -D INPUT -j "$chain-in"; iptables -D OUTPUT -j "$chain-out"
        iptables -F "$chain-in"; iptables -F "$chain-out"; iptables -X "$chain-in"; iptables -X "$chain-out"
        echo "$(date +%T.%3N)   healed: $name" >>"$out/events.txt"
    ) &
}
# Drops (in the current fault's chain) the packets of connections between parties $1 and
# $2, or only of those to port $3.
drop_between() {
    local both=$((bit[$1] | bit[$2]))
    if [ -n "${3:-}" ]; then
        iptables -A "$chain-in" -m connmark --mark "$both/$both" -p tcp --dport "$3" -j DROP
        iptables -A "$chain-in" -m connmark --mark "$both/$both" -p tcp --sport "$3" -j DROP
    else
        iptables -A "$chain-in" -m connmark --mark "$both/$both" -j DROP
    fi
}
cut_between() {
    net_fault "$1" "$2"
    drop_between "$3" "$4" "${5:-}"
}
cut_off() {
    net_fault "$1" "$2"
    local id=$3 other
    for other in etcd $servers; do
        [ "$other" = "$id" ] || drop_between "$id" "$other"
    done
    local port
    for port in "${rpc[$id]}" ${tcp[$id]:+"${tcp[$id]#*:}"}; do
        iptables -A "$chain-out" -p tcp --dport "$port" -j RETURN
        iptables -A "$chain-out" -p tcp --sport "$port" -j RETURN
    done
    iptables -A "$chain-out" -m owner --uid-owner "${uid[$id]}" -j DROP
}
lose() {
    net_fault "$1" "$2"
    iptables -A "$chain-in" -m statistic --mode random --probability 0.05 -j DROP
}

background=""
# (Its kills fail for processes already gone; the script's status stays the checks'.)
cleanup() {
    kill $background 2>/dev/null || true
    for p in "${pid[@]}" $etcd_pid; do kill -CONT "$p" 2>/dev/null || true; kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

[ "$discovery" = etcd ] && etcd_start
for id in $servers; do server_start "$id"; done
wait_port 3250 15 && wait_port 3251 15
sleep 2  # the servers find each other
echo "servers: $discovery discovery${etcd_pid:+ at $etcd_url (pid $etcd_pid)}; $(for id in $servers; do printf '%s %s  ' "$id" "${pid[$id]}"; done)"

seconds=$((minutes * 60))
$bench talk --addr 127.0.0.1:3250 --connections 200 --speakers 4 --duration "$seconds" --warmup 1 \
    >"$out/talk.txt" 2>&1 &
talk=$!
churn_loop() {
    local addr=$1 log=$2 end=$((SECONDS + seconds))
    while [ "$SECONDS" -lt "$end" ]; do
        echo "== $(date +%T) start" >>"$log"
        $bench churn --addr "$addr" --connections 100 --rounds 5 >>"$log" 2>&1 || echo "== $(date +%T) ended: failed" >>"$log"
        sleep 0.2
    done
}
churn_loop 127.0.0.1:3250 "$out/churn-1.txt" &
churn1=$!
churn_loop 127.0.0.1:3251 "$out/churn-2.txt" &
churn2=$!
background="$talk $churn1 $churn2"

# One event every 15 s; freezes and outages end in the background (a subshell that sends
# SIGCONT or starts etcd again), so events overlap.
end=$((SECONDS + seconds - 20))
events_made=0
cut="${CUT_SECONDS:-8}"
thaw() { (sleep "$2"; kill -CONT "$1" 2>/dev/null; echo "$(date +%T.%3N)   thawed pid $1" >>"$out/events.txt") & }
while [ $((SECONDS + 15)) -le "$end" ]; do
    sleep 15
    room=room-$((RANDOM % 3 + 1))
    pick=$((RANDOM % (network == 1 ? 15 : 8)))
    if [ -n "${EVENTS:-}" ]; then
        read -r -a picks <<<"$EVENTS"
        pick=${picks[$((events_made % ${#picks[@]}))]}
    fi
    events_made=$((events_made + 1))
    # Without etcd, its events are a room server's kill and 6 s freeze instead.
    if [ "$discovery" = embedded ] && [ "$pick" -ge 6 ]; then pick=$((pick == 6 ? 0 : 3)); fi
    case $pick in
        0) event "SIGKILL $room"; server_stop "$room" KILL; sleep 1; server_start "$room" ;;
        1) event "SIGTERM $room"; server_stop "$room" TERM; server_start "$room" ;;
        2) event "freeze $room 2 s"; kill -STOP "${pid[$room]}"; thaw "${pid[$room]}" 2 ;;
        3) event "freeze $room 6 s"; kill -STOP "${pid[$room]}"; thaw "${pid[$room]}" 6 ;;
        4) event "SIGTERM connector-2"; server_stop connector-2 TERM; server_start connector-2 ;;
        5) event "SIGKILL connector-2"; server_stop connector-2 KILL; sleep 1; server_start connector-2 ;;
        6)
            if [ "$(awk '{ print $3 }' "/proc/$etcd_pid/stat" 2>/dev/null)" != T ]; then
                event "etcd killed for 8 s"
                kill -KILL "$etcd_pid"; wait "$etcd_pid" 2>/dev/null || true
                sleep 8; etcd_start; event "  etcd started again"
            fi
            ;;
        7) event "freeze etcd 6 s"; kill -STOP "$etcd_pid"; thaw "$etcd_pid" 6 ;;
        8) cut_off "cut $room off $cut s" "$cut" "$room" ;;
        9) cut_off "cut connector-2 off from the servers $cut s" "$cut" connector-2 ;;
        10) cut_between "cut connector-1 from $room $cut s" "$cut" connector-1 "$room" ;;
        11) lose "lose 5% of packets 15 s" 15 ;;
        12) cut_between "connector-1 cannot call $room $cut s" "$cut" connector-1 "$room" "${rpc[$room]}" ;;
        13) cut_between "$room cannot call connector-1 $cut s" "$cut" connector-1 "$room" "${rpc[connector-1]}" ;;
        14) cut_between "cut $room from etcd $cut s" "$cut" "$room" etcd ;;
    esac
done
event "last event made; settling"
wait "$talk" "$churn1" "$churn2" || true
background=""
sleep 10  # every freeze over

failed=0
check() { if "$@"; then :; else echo "CHECK FAILED: $*"; failed=1; fi; }
echo "== checks"
for id in $servers; do
    check kill -0 "${pid[$id]}"
done
if [ "$discovery" = etcd ]; then
    listed=$(curl -s -X POST "$etcd_url/v3/kv/range" \
        -d "{\"key\":\"$(printf 'dragonfruit/servers/' | base64)\",\"range_end\":\"$(printf 'dragonfruit/servers0' | base64)\",\"count_only\":true}" \
        | grep -o '"count":"[0-9]*"' | grep -o '[0-9]*' || echo 0)
else
    listed=$(find "$out/registry" -name '*.json' | wc -l)
fi
echo "  $discovery lists $listed servers"
check [ "$listed" = 5 ]
for port in 3250 3251; do
    $bench echo --addr "127.0.0.1:$port" --route room.room.echo --connections 16 --inflight 4 --duration 5 --warmup 1 \
        >"$out/echo-$port.txt" 2>&1 || true
    grep -E "requests/s|errors" "$out/echo-$port.txt" | sed "s/^/  $port: /"
    check grep -q "requests/s" "$out/echo-$port.txt"
    check [ -z "$(grep -E '^ *errors' "$out/echo-$port.txt" | grep -v ' 0$' || true)" ]
done
echo "== servers' memory"
for id in $servers; do echo "  $id $(awk '/VmRSS/ {print $2, $3}' "/proc/${pid[$id]}/status" 2>/dev/null)"; done
echo "== stop"
for id in connector-1 connector-2 room-1 room-2 room-3; do
    status=0
    kill -TERM "${pid[$id]}" 2>/dev/null || true
    wait "${pid[$id]}" 2>/dev/null || status=$?
    echo "  $id exited with status $status"
    check [ "$status" = 0 ]
done
if [ -n "$etcd_pid" ]; then kill -TERM "$etcd_pid"; wait "$etcd_pid" 2>/dev/null || true; fi
etcd_pid=""

echo "== events"
cat "$out/events.txt"
echo "== talk (one room, its members and speakers on connector-1)"
talk_summary "$out/talk.txt"
for n in 1 2; do
    echo "== churn on connector-$n"
    awk '/^== .* start/ { t = $2 } /players total/ { players += $3 }
        /errors at/ { errors += $1; print "  " t " wave: " $0 } /ended: failed/ { print "  " $0 }
        /^error/ { print "  " t " " $0 }
        END { printf "  players %d, failed %d\n", players, errors }' "$out/churn-$n.txt" | tail -40
done
echo "== servers' warnings and errors, by kind"
for id in $servers; do
    echo "-- $id"
    warning_kinds "$out/$id.log" 170 15
done
echo "== panics: $(grep -l "panicked" "$out"/*.log 2>/dev/null | tr '\n' ' ')"
check [ -z "$(grep -l "panicked" "$out"/*.log 2>/dev/null || true)" ]
if [ "$failed" = 0 ]; then echo "chaos: all checks passed (seed $seed)"; else echo "chaos: checks failed (seed $seed)"; exit 1; fi
