# Helpers shared by scripts/bench.sh and scripts/chaos.sh (sourced, not run).

# Waits until something listens on loopback port $1 (at most $2 seconds, default 10);
# fails saying so otherwise.
wait_port() {
    local tries=$(( ${2:-10} * 20 ))
    for _ in $(seq "$tries"); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on port $1 (a server did not start)" >&2
    return 1
}

# The warnings and errors of log $1: alike lines counted together (numbers made N, cut at
# $2 characters), the $3 most frequent kinds.
warning_kinds() {
    grep -E "^\[[^ ]+ (WARN|ERROR) " "$1" \
        | sed -E 's/^\[[^ ]+ (WARN|ERROR) +[^]]*\] /\1 /; s/[0-9]+/N/g' | cut -c1-"$2" | sort | uniq -c | sort -rn \
        | head -"$3" || true
}

# The summary lines of a `dragonfruit-bench talk` output file $1 (or its last lines, if it
# ended early).
talk_summary() {
    grep -E "^talk|^  (lines said/s|pushes heard/s|heard |speaker latency|echo errors)|^error" "$1" || tail -3 "$1"
}
