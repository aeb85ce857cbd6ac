#!/usr/bin/env bash
# For comparison: the same echo loads against pinus (the Node.js successor of pomelo), as a
# connector frontend and two "room" backends on this machine, driven by our load tool.
# Needs node and npm (scripts/test.sh installs them); installs pinus into a temporary
# directory, starts its master (which starts the three servers), runs the loads, stops it.
#
#   scripts/pinus-compare.sh [CONNECTIONS INFLIGHT]   (default 64 16; DURATION=secs, default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
conns="${1:-64}"
inflight="${2:-16}"
cargo build --release --locked -q -p dragonfruit-client
bench="$PWD/target/release/dragonfruit-bench"
dir=$(mktemp -d)
master=""
cleanup() {
    if [ -n "$master" ]; then kill "$master" 2>/dev/null || true; fi
    pkill -f "$dir/app.js" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
cd "$dir"
npm init -y >/dev/null
npm install --no-audit --no-fund --silent pinus@1.7.4 reflect-metadata@0.2.2 >/dev/null
mkdir -p config app/servers/connector/handler app/servers/room/handler
cat > app.js <<'JS'
require('reflect-metadata');
const pinus = require('pinus').pinus;
const app = pinus.createApp({ base: __dirname });
app.set('name', 'bench');
app.configure('production|development', 'connector', function () {
  app.set('connectorConfig', { connector: pinus.connectors.hybridconnector, heartbeat: 30, useDict: false, useProtobuf: false });
});
app.start();
JS
cat > config/master.json <<'JSON'
{ "development": { "id": "master-server-1", "host": "127.0.0.1", "port": 3005 } }
JSON
cat > config/servers.json <<'JSON'
{ "development": {
  "connector": [ { "id": "connector-server-1", "host": "127.0.0.1", "port": 3150, "clientHost": "127.0.0.1", "clientPort": 3010, "frontend": true } ],
  "room": [ { "id": "room-server-1", "host": "127.0.0.1", "port": 3160 }, { "id": "room-server-2", "host": "127.0.0.1", "port": 3161 } ]
} }
JSON
token=agarxhqb98rpajloaxn34ga8xrunpagkjwlaw3ruxnpaagl29w4rxn
echo "[{\"type\":\"connector\",\"token\":\"$token\"},{\"type\":\"room\",\"token\":\"$token\"}]" > config/adminServer.json
echo '[]' > config/adminUser.json
for t in connector room; do
    cat > "app/servers/$t/handler/h.js" <<'JS'
function Handler(app) { this.app = app; }
Handler.prototype.echo = async function (msg, session) { return msg; };
module.exports = function (app) { return new Handler(app); };
JS
done
NODE_ENV=development node app.js >pinus.log 2>&1 &
master=$!
for _ in $(seq 100); do
    if (exec 3<>/dev/tcp/127.0.0.1/3010) 2>/dev/null; then break; fi
    sleep 0.2
done
sleep 1
pids=$(pgrep -d, -f "$dir/app.js .*id=(connector|room)-server")
for route in connector.h.echo room.h.echo; do
    echo "pinus $route, $conns x $inflight:"
    "$bench" echo --addr 127.0.0.1:3010 --route "$route" --connections "$conns" --inflight "$inflight" \
        --duration "${DURATION:-10}" --warmup 2 --server-pid "$pids" || echo "(the load tool reported failures above)"
done
