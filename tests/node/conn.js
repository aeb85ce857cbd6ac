// One client connection driven with the npm `pomelo-protocol` codec over a Node net.Socket,
// the way pomelo/pinus JS clients use it:
// - the caller splits the TCP stream into packages (pomelo-protocol decodes whole ones only);
// - routes in the handshake's `sys.dict` are sent as codes (route-code bit), as
//   pomelo-jsclient does, and coded routes received are mapped back with the same dict.
'use strict';
const net = require('net');
const Protocol = require('pomelo-protocol');
const { Package, Message } = Protocol;

function fail(why) {
  console.error('FAIL: ' + why);
  process.exit(1);
}

function check(cond, why) {
  if (!cond) fail(why);
}

/// Fails the script after `ms` unless cleared: no step may hang.
function deadline(ms) {
  return setTimeout(() => fail('timed out'), ms);
}

class Conn {
  constructor(addr, name) {
    const [host, port] = addr.split(':');
    this.name = name;
    this.sock = net.connect(Number(port), host);
    this.pending = Buffer.alloc(0);
    this.packets = [];
    this.waiter = null;
    this.closed = false;
    this.dict = {};
    this.abbrs = {};
    this.sock.on('data', (chunk) => {
      this.pending = Buffer.concat([this.pending, chunk]);
      while (this.pending.length >= 4) {
        const len = (this.pending[1] << 16) | (this.pending[2] << 8) | this.pending[3];
        if (this.pending.length < 4 + len) break;
        this.packets.push(Package.decode(this.pending.slice(0, 4 + len)));
        this.pending = this.pending.slice(4 + len);
      }
      this.wake();
    });
    this.sock.on('close', () => { this.closed = true; this.wake(); });
    this.sock.on('error', (e) => { if (!this.closed) fail(name + ': socket error ' + e.message); });
  }

  wake() {
    if (this.waiter) { const w = this.waiter; this.waiter = null; w(); }
  }

  async connected() {
    await new Promise((resolve) => this.sock.once('connect', resolve));
  }

  /// Sends a pomelo-style handshake and returns the server's answer (not yet acked); keeps
  /// its route dictionary.
  async handshake() {
    const hs = { sys: { type: 'js-tcp', version: '0.0.1', rsa: {} }, user: {} };
    this.sock.write(Package.encode(Package.TYPE_HANDSHAKE, Protocol.strencode(JSON.stringify(hs))));
    const resp = await this.nextPacket();
    check(resp && resp.type === Package.TYPE_HANDSHAKE, this.name + ': handshake response');
    const data = JSON.parse(Protocol.strdecode(resp.body));
    check(data.code === 200, this.name + ': handshake code ' + data.code);
    this.dict = (data.sys && data.sys.dict) || {};
    for (const route of Object.keys(this.dict)) this.abbrs[this.dict[route]] = route;
    return data;
  }

  ack() {
    this.sock.write(Package.encode(Package.TYPE_HANDSHAKE_ACK));
  }

  send(id, type, route, obj) {
    const body = obj === undefined ? null : Protocol.strencode(JSON.stringify(obj));
    const code = this.dict[route];
    const msg = code === undefined ? Message.encode(id, type, 0, route, body) : Message.encode(id, type, 1, code, body);
    this.sock.write(Package.encode(Package.TYPE_DATA, msg));
  }

  /// The next package (heartbeats skipped unless asked for), or null once closed.
  async nextPacket(skipHeartbeats = true) {
    for (;;) {
      while (this.packets.length) {
        const p = this.packets.shift();
        if (skipHeartbeats && p.type === Package.TYPE_HEARTBEAT) continue;
        return p;
      }
      if (this.closed) return null;
      await new Promise((resolve) => { this.waiter = resolve; });
    }
  }

  /// The next data message, its route mapped back from its code and its body parsed as JSON.
  async nextMessage() {
    const p = await this.nextPacket();
    check(p && p.type === Package.TYPE_DATA, this.name + ': expected a data package, got ' + JSON.stringify(p && p.type));
    const m = Message.decode(p.body);
    if (m.compressRoute) {
      check(this.abbrs[m.route] !== undefined, this.name + ': route code ' + m.route + ' not in the dictionary');
      m.route = this.abbrs[m.route];
    }
    m.json = m.body.length ? JSON.parse(Protocol.strdecode(m.body)) : null;
    return m;
  }

  /// Sends request `id` and returns its response, which must come next.
  async request(id, route, obj) {
    this.send(id, Message.TYPE_REQUEST, route, obj);
    const m = await this.nextMessage();
    check(m.type === Message.TYPE_RESPONSE && m.id === id, this.name + ': response to ' + route + ' expected, got type ' + m.type + ' id ' + m.id);
    return m;
  }

  /// The next message must be a push of `route`; returns its body.
  async push(route) {
    const m = await this.nextMessage();
    check(m.type === Message.TYPE_PUSH && m.route === route, this.name + ': push ' + route + ' expected, got type ' + m.type + ' route ' + m.route);
    return m;
  }

  close() {
    this.sock.end();
  }
}

module.exports = { Conn, Protocol, Package, Message, check, fail, deadline };
