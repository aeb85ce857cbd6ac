// Drives a dragonfruit server with the npm `pomelo-protocol` codec (what pomelo/pinus JS
// clients use) over a Node net.Socket: handshake, ack, echo, notify, push, heartbeat,
// error response, kick. Prints "ok <step>" per step; exits non-zero on any failure.
// Usage: node pomelo_client.js HOST:PORT   (the server must register the test probe)
'use strict';
const { Conn, Protocol, Package, Message, check, fail, deadline } = require('./conn');

const timer = deadline(15000);
const conn = new Conn(process.argv[2], 'client');
const sendData = (id, type, route, obj) => conn.send(id, type, route, obj);
const nextPacket = (skipHeartbeats) => conn.nextPacket(skipHeartbeats);
const nextMessage = () => conn.nextMessage();

async function main() {
  await conn.connected();
  const data = await conn.handshake();
  check(data.sys.heartbeat === 1, 'heartbeat ' + data.sys.heartbeat);
  console.log('ok handshake');

  conn.ack();
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

  conn.sock.write(Package.encode(Package.TYPE_HEARTBEAT));
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
