// Plays the sample game through its cluster (connector + room servers) with the npm
// `pomelo-protocol` codec, as a pomelo/pinus JS client would: route codes from the
// handshake dictionary, login on the connector, rooms on the room servers (forwarded),
// pushes from the room servers through the connector. Prints "ok <step>" per step; exits
// non-zero on any failure.
// Usage: node pomelo_player.js HOST:PORT   (the sample game's connector)
'use strict';
const { Conn, Message, check, deadline } = require('./conn');

const addr = process.argv[2];
const timer = deadline(20000);

async function player(name) {
  const c = new Conn(addr, name);
  await c.connected();
  await c.handshake();
  c.ack();
  return c;
}

async function main() {
  const alice = await player('alice');
  for (const route of ['connector.entry.login', 'room.room.join', 'room.room.say', 'onChat']) {
    check(typeof alice.dict[route] === 'number', 'dictionary has ' + route + ': ' + JSON.stringify(alice.dict));
  }
  console.log('ok handshake');

  let m = await alice.request(1, 'connector.entry.login', { name: 'alice' });
  check(m.json.uid === 'alice', 'login ' + JSON.stringify(m.json));
  const bob = await player('bob');
  m = await bob.request(1, 'connector.entry.login', { name: 'bob' });
  check(m.json.uid === 'bob', 'login ' + JSON.stringify(m.json));
  console.log('ok login');

  m = await alice.request(2, 'room.room.join', { room: 'lobby' });
  check(JSON.stringify(m.json) === '{"room":"lobby","members":["alice"]}', 'alice joins ' + JSON.stringify(m.json));
  m = await bob.request(2, 'room.room.join', { room: 'lobby' });
  check(JSON.stringify(m.json.members) === '["alice","bob"]', 'bob joins ' + JSON.stringify(m.json));
  m = await alice.push('onJoin');
  check(m.compressRoute && m.json.uid === 'bob', 'onJoin by code: ' + JSON.stringify(m));
  console.log('ok join');

  bob.send(0, Message.TYPE_NOTIFY, 'room.room.say', { text: 'hi' });
  for (const c of [alice, bob]) {
    m = await c.push('onChat');
    check(m.json.from === 'bob' && m.json.text === 'hi', c.name + ' onChat ' + JSON.stringify(m.json));
  }
  console.log('ok chat');

  // A route sent as a string, as for routes outside the dictionary: served the same.
  alice.dict = {};
  m = await alice.request(3, 'room.room.echo', { n: 1 });
  check(m.json.n === 1, 'echo ' + JSON.stringify(m.json));
  console.log('ok string route');

  // Pomelo clients ignore the error flag: errors are responses with a {code, msg} body.
  m = await alice.request(4, 'room.room.nope', {});
  check(m.json.code === 'PIT-404', 'unknown room route ' + JSON.stringify(m.json));
  m = await alice.request(5, 'room.room.left', { uid: 'bob', room: 'lobby' });
  check(m.json.code === 'PIT-404', 'a remote is not a client route ' + JSON.stringify(m.json));
  console.log('ok errors');

  m = await bob.request(3, 'room.room.leave', {});
  check(m.json.room === 'lobby', 'leave ' + JSON.stringify(m.json));
  m = await alice.push('onLeave');
  check(m.json.uid === 'bob', 'onLeave ' + JSON.stringify(m.json));
  console.log('ok leave');

  // A player whose connection drops leaves the room (the connector's on-close callback calls
  // the room server).
  const carol = await player('carol');
  await carol.request(1, 'connector.entry.login', { name: 'carol' });
  await carol.request(2, 'room.room.join', { room: 'lobby' });
  m = await alice.push('onJoin');
  check(m.json.uid === 'carol', 'carol joins ' + JSON.stringify(m.json));
  carol.close();
  m = await alice.push('onLeave');
  check(m.json.uid === 'carol', 'carol left on disconnect ' + JSON.stringify(m.json));
  console.log('ok disconnect');

  alice.close();
  bob.close();
  clearTimeout(timer);
}

main().catch((e) => {
  console.error('FAIL: ' + (e.stack || String(e)));
  process.exit(1);
});
