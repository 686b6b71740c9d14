// Socket.IO connection state recovery (SPEC §11) with the real
// socket.io-client 4.8: the client is told a pid, keeps the offset that ends
// every tracked event, and when its TCP connection is cut (no DISCONNECT,
// no close frame) it reconnects with {pid, offset} and sees
// `socket.recovered === true`, its old `socket.id`, the events it missed in
// order, then live ones. Without history, after `history.ttl`, or with a pid
// the server does not know, it connects as new.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { startPulso, token, once, until } from './lib/pulso.mjs';

const NS = '/notifications';
const HISTORY = { PULSO_HISTORY_TOPICS: 'assistant,assistant_2,assistant_3' };
let pulso;

before(async () => {
  pulso = await startPulso(HISTORY);
});
after(async () => {
  assert.equal(await pulso.stop(), 0, 'pulso exits 0 on SIGTERM');
});

const opened = [];
after(() => {
  for (const s of opened) {
    try { s.close(); } catch { /* already closed */ }
  }
});

/** A socket.io-client 4.x socket on the notifications namespace, over WebSocket. */
async function connect(server, opts = {}) {
  const socket = io(server.url + NS, { transports: ['websocket'], forceNew: true, ...opts });
  opened.push(socket);
  await once(socket, 'connect');
  return socket;
}

/** Authenticates as an assistant of a tournament (rooms assistant, assistant_<t>). */
async function authenticate(socket, sub, tournamentId = 2) {
  const ack = await socket.timeout(5000).emitWithAck('get', {
    url: NS,
    params: { 'jwt-api-key': token('assistant', sub), tournamentId },
  });
  assert.equal(ack.statusCode, 200, JSON.stringify(ack));
  assert.deepEqual(ack.body.rooms, ['assistant', `assistant_${tournamentId}`]);
}

/** Every `check_in` event's arguments, in order of arrival. */
function record(socket) {
  const got = [];
  socket.on('check_in', (...args) => got.push(args));
  return got;
}

async function broadcast(server, rooms, data) {
  const res = await server.post('/api/broadcast', { rooms, event: 'check_in', data });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  return res.body.recipients;
}

/** Sessions the server keeps for recovery (its metric). */
async function kept(server) {
  const text = (await server.get('/metrics')).body;
  const m = /^pulso_socketio_recovery_sessions (\d+)/m.exec(text);
  return m ? Number(m[1]) : 0;
}

/** Cuts the client's TCP connection under it: no DISCONNECT, no close frame. */
async function cut(socket) {
  const gone = once(socket, 'disconnect');
  socket.io.engine.transport.ws._socket.destroy();
  const r = await gone;
  assert.equal(Array.isArray(r) ? r[0] : r, 'transport close');
}

test('a cut connection recovers: same socket.id, the 50 missed events in order, then live ones', async () => {
  // Reconnected by hand once the events are published, so they are all
  // missed ones: the client's own reconnection is the next test.
  const socket = await connect(pulso, { reconnection: false });
  assert.equal(socket.recovered, false);
  await authenticate(socket, 'recovers');
  const got = record(socket);
  await broadcast(pulso, ['assistant_2'], 0);
  await until('the first event', () => got.length === 1);
  // The offset is the event's last argument, and the client kept it.
  const [payload, offset] = got[0];
  assert.equal(payload, 0);
  assert.match(offset, /^[\w-]+:\d+$/);
  assert.equal(socket._lastOffset, offset);
  const id = socket.id;

  await cut(socket);
  await until('the session kept', async () => (await kept(pulso)) === 1);
  for (let n = 1; n <= 50; n++) {
    await broadcast(pulso, n % 2 ? ['assistant_2'] : ['assistant', 'assistant_2'], n);
  }
  socket.connect();
  await once(socket, 'connect');
  assert.equal(socket.recovered, true);
  assert.equal(socket.id, id);
  await until('the missed events', () => got.length === 51);
  await broadcast(pulso, ['assistant'], 'live');
  await until('the live event', () => got.length === 52);
  assert.deepEqual(got.map((a) => a[0]), [...Array(51).keys(), 'live']);
  const seqs = got.map((a) => Number(a[1].split(':')[1]));
  assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), `offsets grow: ${seqs}`);
  // Still authenticated in its rooms: no new `get` was needed.
  assert.equal(await broadcast(pulso, ['assistant_2'], 'again'), 1);
  await until('the next event', () => got.length === 53);
  socket.close();
});

test("the client's own reconnection recovers, whatever is published meanwhile", async () => {
  const socket = await connect(pulso, { reconnectionDelay: 300, randomizationFactor: 0 });
  await authenticate(socket, 'auto');
  const got = record(socket);
  await broadcast(pulso, ['assistant'], 0);
  await until('the first event', () => got.length === 1);
  const id = socket.id;
  const back = once(socket, 'connect');
  await cut(socket);
  // Published while it is away and while it comes back: each arrives once,
  // in order, replayed or live.
  for (let n = 1; n <= 50; n++) {
    await broadcast(pulso, ['assistant_2'], n);
  }
  await back;
  assert.equal(socket.recovered, true);
  assert.equal(socket.id, id);
  await broadcast(pulso, ['assistant'], 51);
  await until('every event', () => got.length === 52);
  assert.deepEqual(got.map((a) => a[0]), [...Array(52).keys()]);
  socket.close();
});

test('a pid the server does not know connects as new', async () => {
  const socket = await connect(pulso, { reconnection: false });
  await authenticate(socket, 'garbage', 3);
  const got = record(socket);
  await broadcast(pulso, ['assistant_3'], 0);
  await until('the first event', () => got.length === 1);
  const id = socket.id;
  await cut(socket);
  await until('the session kept', async () => (await kept(pulso)) === 1);
  socket._pid = 'garbage';
  socket.connect();
  await once(socket, 'connect');
  assert.equal(socket.recovered, false);
  assert.notEqual(socket.id, id);
  // Not authenticated: its rooms are gone, and the kept session is
  // still there for its real pid.
  assert.equal(await broadcast(pulso, ['assistant_3'], 1), 0);
  assert.equal(await kept(pulso), 1);
  socket.close();
});

test('without history there is no recovery', async () => {
  const plain = await startPulso();
  try {
    const socket = await connect(plain, { reconnection: false });
    await authenticate(socket, 'plain');
    const got = record(socket);
    await broadcast(plain, ['assistant'], 0);
    await until('the event', () => got.length === 1);
    assert.deepEqual(got[0], [0], 'no offset');
    const id = socket.id;
    await cut(socket);
    socket.connect();
    await once(socket, 'connect');
    // No pid was ever given: socket.io-client leaves `recovered` falsy
    // (undefined), as against a socket.io server without recovery.
    assert.ok(!socket.recovered);
    assert.notEqual(socket.id, id);
    assert.equal(await broadcast(plain, ['assistant'], 1), 0);
    socket.close();
  } finally {
    assert.equal(await plain.stop(), 0);
  }
});

test('after history.ttl the client connects as new', async () => {
  const short = await startPulso({ ...HISTORY, PULSO_HISTORY_TTL: '300ms' });
  try {
    const socket = await connect(short, { reconnection: false });
    await authenticate(socket, 'late');
    const got = record(socket);
    await broadcast(short, ['assistant'], 0);
    await until('the event', () => got.length === 1);
    const id = socket.id;
    await cut(socket);
    await until('the session kept', async () => (await kept(short)) === 1);
    await until('the session swept', async () => (await kept(short)) === 0);
    socket.connect();
    await once(socket, 'connect');
    assert.equal(socket.recovered, false);
    assert.notEqual(socket.id, id);
    socket.close();
  } finally {
    assert.equal(await short.stop(), 0);
  }
});
