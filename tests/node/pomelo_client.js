// Drives a dragonfruit server with the npm `pomelo-protocol` codec (what pomelo/pinus JS
// clients use) over a Node net.Socket: handshake, ack, echo, notify, push, heartbeat,
// error response, kick. Prints "ok <step>" per step; exits non-zero on any failure.
// Usage: node pomelo_client.js HOST:PORT   (the server must register the test probe)
'use strict';
const net = require('net');
const Protocol = require('pomelo-protocol');
const { Package, Message } = Protocol;

const [host, port] = process.argv[2].split(':');
const sock = net.connect(Number(port), host);
const timer = setTimeout(() => fail('timed out'), 15000);

let pending = Buffer.alloc(0);
const packets = [];
let waiter = null;
let closed = false;

function fail(why) {
  console.error('FAIL: ' + why);
  process.exit(1);
}

function check(cond, why) {
  if (!cond) fail(why);
}

// pomelo-protocol decodes whole packages only: the caller splits the TCP stream.
sock.on('data', (chunk) => {
  pending = Buffer.concat([pending, chunk]);
  while (pending.length >= 4) {
    const len = (pending[1] << 16) | (pending[2] << 8) | pending[3];
    if (pending.length < 4 + len) break;
    packets.push(Package.decode(pending.slice(0, 4 + len)));
    pending = pending.slice(4 + len);
  }
  wake();
});
sock.on('close', () => { closed = true; wake(); });
sock.on('error', (e) => { if (!closed) fail('socket error ' + e.message); });

function wake() {
  if (waiter) { const w = waiter; waiter = null; w(); }
}

async function nextPacket(skipHeartbeats = true) {
  for (;;) {
    while (packets.length) {
      const p = packets.shift();
      if (skipHeartbeats && p.type === Package.TYPE_HEARTBEAT) continue;
      return p;
    }
    if (closed) return null;
    await new Promise((resolve) => { waiter = resolve; });
  }
}

function sendData(id, type, route, obj) {
  const body = obj === undefined ? null : Protocol.strencode(JSON.stringify(obj));
  sock.write(Package.encode(Package.TYPE_DATA, Message.encode(id, type, 0, route, body)));
}

async function nextMessage() {
  const p = await nextPacket();
  check(p && p.type === Package.TYPE_DATA, 'expected a data package, got ' + JSON.stringify(p && p.type));
  const m = Message.decode(p.body);
  m.json = m.body.length ? JSON.parse(Protocol.strdecode(m.body)) : null;
  return m;
}

async function main() {
  await new Promise((resolve) => sock.once('connect', resolve));

  const hs = { sys: { type: 'js-tcp', version: '0.0.1', rsa: {} }, user: {} };
  sock.write(Package.encode(Package.TYPE_HANDSHAKE, Protocol.strencode(JSON.stringify(hs))));
  const resp = await nextPacket();
  check(resp && resp.type === Package.TYPE_HANDSHAKE, 'handshake response');
  const data = JSON.parse(Protocol.strdecode(resp.body));
  check(data.code === 200, 'handshake code ' + data.code);
  check(data.sys.heartbeat === 1, 'heartbeat ' + data.sys.heartbeat);
  console.log('ok handshake');

  sock.write(Package.encode(Package.TYPE_HANDSHAKE_ACK));
  console.log('ok ack');

  sendData(1, Message.TYPE_REQUEST, 'connector.probe.echo', { hello: 'pomelo' });
  let m = await nextMessage();
  check(m.type === Message.TYPE_RESPONSE && m.id === 1, 'echo response id ' + m.id);
  check(m.json.hello === 'pomelo', 'echo body ' + JSON.stringify(m.json));
  console.log('ok echo');

  sendData(0, Message.TYPE_NOTIFY, 'probe.note', { from: 'node' });
  sendData(2, Message.TYPE_REQUEST, 'probe.echo', 'after notify');
  m = await nextMessage();
  check(m.id === 2 && m.json === 'after notify', 'a notify gets no answer; next is response 2, got ' + m.id);
  console.log('ok notify');

  sendData(3, Message.TYPE_REQUEST, 'probe.push', { n: 7 });
  const seen = {};
  for (let i = 0; i < 2; i++) {
    m = await nextMessage();
    if (m.type === Message.TYPE_PUSH) {
      check(m.route === 'onMsg' && m.json.n === 7, 'push ' + m.route + ' ' + JSON.stringify(m.json));
      seen.push = true;
    } else {
      check(m.type === Message.TYPE_RESPONSE && m.id === 3 && m.json === true, 'push response');
      seen.response = true;
    }
  }
  check(seen.push && seen.response, 'push and response');
  console.log('ok push');

  sock.write(Package.encode(Package.TYPE_HEARTBEAT));
  const hb = await nextPacket(false);
  check(hb && hb.type === Package.TYPE_HEARTBEAT, 'server heartbeat, got ' + JSON.stringify(hb && hb.type));
  console.log('ok heartbeat');

  // Pomelo clients do not know the error flag (0x20): they see a normal response whose
  // body carries the error.
  sendData(4, Message.TYPE_REQUEST, 'probe.nope', {});
  m = await nextMessage();
  check(m.type === Message.TYPE_RESPONSE && m.id === 4, 'error response type ' + m.type);
  check(m.json.code === 'PIT-404', 'error code ' + JSON.stringify(m.json));
  console.log('ok error');

  sendData(5, Message.TYPE_REQUEST, 'probe.kick', 'bye');
  for (;;) {
    const p = await nextPacket();
    check(p !== null, 'closed without a kick package');
    if (p.type === Package.TYPE_DATA) continue;
    check(p.type === Package.TYPE_KICK, 'kick package, got ' + p.type);
    // pomelo clients JSON.parse the kick body
    const kick = JSON.parse(Protocol.strdecode(p.body));
    check(kick.reason === 'bye', 'kick reason ' + JSON.stringify(kick));
    break;
  }
  check((await nextPacket()) === null, 'closed after kick');
  console.log('ok kick');
  clearTimeout(timer);
}

main().catch((e) => fail(e.stack || String(e)));
