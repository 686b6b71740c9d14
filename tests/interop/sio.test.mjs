// Real Socket.IO clients against the notifications endpoint (SPEC §4, §5, §7):
// socket.io-client 4.x (WebSocket, polling, polling→upgrade), socket.io-client
// 2.x (Engine.IO 3) and sails.io.js 1.2.1 itself (on socket.io-client 2.x).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { io as io4 } from 'socket.io-client';
import io2 from 'sio2';
import sailsIOClient from 'sails.io.js';
import { pulsoForFile, startPulso, token, once, until, runPage } from './lib/pulso.mjs';
import { NS, emitAck, inbox, sailsAuth } from './lib/clients.mjs';
import { chromiumOr } from './lib/services.mjs';
import { readFileSync } from 'node:fs';

const { pulso, opened } = pulsoForFile();

/** The reason of a 'disconnect' event (4.x also passes a description). */
async function disconnectReason(socket) {
  const r = await once(socket, 'disconnect');
  return Array.isArray(r) ? r[0] : r;
}

// sails.io.js augments the io function it is given, once.
let sailsIo;

/** Connects a client of `kind` to the notifications namespace. */
async function connect(kind) {
  const [version, transport] = kind.split('-');
  const lib = { v4: io4, v2: io2 }[version];
  if (!lib || !['websocket', 'polling', 'upgrade'].includes(transport)) throw new Error(kind);
  // 'upgrade': the client's default, long-polling then WebSocket.
  const transports = transport === 'upgrade' ? {} : { transports: [transport] };
  const socket = lib(pulso.url + NS, { ...transports, reconnection: false, forceNew: true });
  opened.push(socket);
  await once(socket, 'connect');
  return socket;
}

/** A sails.io.js socket (its own wire format: {method, headers, data, url}). */
async function connectSails() {
  if (!sailsIo) {
    sailsIo = sailsIOClient(io2);
    sailsIo.sails.autoConnect = false;
    sailsIo.sails.environment = 'production'; // no console banners
    sailsIo.sails.reconnection = false;
  }
  const socket = sailsIo.sails.connect(pulso.url + NS, { multiplex: false });
  opened.push({ close: () => socket.isConnected() && socket.disconnect() });
  await until('sails socket connected', () => socket.isConnected());
  return socket;
}

async function presenceOf(sub) {
  const { status, body } = await pulso.get(`/api/presence?sub=${encodeURIComponent(sub)}`);
  assert.equal(status, 200, JSON.stringify(body));
  return body.sockets;
}

for (const kind of ['v4-websocket', 'v4-polling', 'v4-upgrade', 'v2-websocket', 'v2-polling', 'v2-upgrade']) {
  test(`${kind}: authenticates, joins its rooms, presence set and cleared`, async () => {
    const sub = `${kind}-assistant`;
    const socket = await connect(kind);
    const ack = await sailsAuth(socket, token('assistant', sub), { tournamentId: 2 });
    assert.deepEqual(ack, { body: { socketId: socket.id, rooms: ['assistant', 'assistant_2'] }, statusCode: 200 });
    if (kind.startsWith('v2')) assert.match(socket.id, /^\/notifications#/);

    const rows = await until('presence row', async () => {
      const r = await presenceOf(sub);
      return r.length === 1 && r;
    });
    assert.equal(rows[0].socket_id, socket.id);
    assert.equal(rows[0].protocol, 'socketio');
    assert.equal(rows[0].role, 'assistant');

    if (kind.endsWith('-upgrade')) {
      await until('upgraded to WebSocket', () => socket.io.engine.transport.name === 'websocket');
    }

    // Own-id room.
    const next = inbox(socket, 'direct');
    const res = await pulso.post('/api/broadcast', { rooms: socket.id, event: 'direct', data: { hi: kind } });
    assert.deepEqual(res, { status: 200, body: { recipients: 1 } });
    assert.deepEqual(await next(), { hi: kind });

    socket.disconnect();
    await until('presence cleared', async () => (await presenceOf(sub)).length === 0);
  });
}

test('sails.io.js: socket.get(/notifications) authenticates with its own request shape', async () => {
  const socket = await connectSails();
  const [body, jwr] = await new Promise((resolve) =>
    socket.get(NS, { 'jwt-api-key': token('assistant', 'sails-1'), tournamentId: 2 }, (b, j) => resolve([b, j])),
  );
  assert.equal(jwr.statusCode, 200);
  assert.deepEqual(body.rooms, ['assistant', 'assistant_2']);
  assert.equal(body.socketId, socket._raw.id);
  const rows = await until('presence row', async () => {
    const r = await presenceOf('sails-1');
    return r.length === 1 && r;
  });
  assert.equal(rows[0].socket_id, socket._raw.id);

  // Server-initiated messages are plain events.
  const got = new Promise((resolve) => socket.on('check_in', resolve));
  const res = await pulso.post('/api/broadcast', { rooms: 'assistant_2', event: 'check_in', data: { check_in_id: { id: 4, nick: 'aguila_calva' } } });
  assert.equal(res.status, 200);
  assert.deepEqual(await got, { check_in_id: { id: 4, nick: 'aguila_calva' } });

  // A failed request: error body, status code, then the server disconnects.
  const bad = await connectSails();
  const disconnected = disconnectReason(bad._raw);
  const [errBody, errJwr] = await new Promise((resolve) =>
    bad.get(NS, { 'jwt-api-key': 'nope' }, (b, j) => resolve([b, j])),
  );
  assert.equal(errJwr.statusCode, 401);
  assert.equal(errBody.error.code, '401-2');
  assert.equal(await disconnected, 'io server disconnect');

  socket.disconnect();
  await until('presence cleared', async () => (await presenceOf('sails-1')).length === 0);
});

const failures = [
  ['400-1', 400, () => 'not an object'],
  ['400-1', 400, () => ({ params: { 'jwt-api-key': token('assistant', 'x') } })],
  ['404-1', 404, () => ({ url: '/elsewhere', params: { 'jwt-api-key': token('assistant', 'x') } })],
  ['401-1', 401, () => ({ url: NS, params: {} })],
  ['401-2', 401, () => ({ url: NS, params: { 'jwt-api-key': 'not-a-jwt' } })],
  ['401-2', 401, () => ({ url: NS, params: { 'jwt-api-key': 12345 } })],
  ['401-3', 401, () => ({ url: NS, params: { 'jwt-api-key': token('assistant', 'x', {}, { expiresIn: -10 }) } })],
];

for (const kind of ['v4-websocket', 'v2-polling']) {
  test(`${kind}: every failure code is acknowledged, then the socket is disconnected`, async () => {
    for (const [code, status, make] of failures) {
      const socket = await connect(kind);
      const disconnected = disconnectReason(socket);
      const ack = await emitAck(socket, 'get', make());
      assert.equal(ack.statusCode, status, JSON.stringify(ack));
      assert.equal(ack.body.error.code, code, JSON.stringify(ack));
      assert.equal(typeof ack.body.error.message, 'string');
      assert.equal(await disconnected, 'io server disconnect');
    }
  });
}

test('403-1 when the role is not in socketio.allowed_roles', async () => {
  const restricted = await startPulso({ PULSO_SOCKETIO_ALLOWED_ROLES: 'assistant,timer' });
  try {
    const socket = io4(restricted.url + NS, { transports: ['websocket'], reconnection: false });
    await once(socket, 'connect');
    const disconnected = disconnectReason(socket);
    const ack = await sailsAuth(socket, token('admin', 'a'));
    assert.deepEqual(ack.body.error.code, '403-1');
    assert.equal(ack.statusCode, 403);
    assert.equal(await disconnected, 'io server disconnect');
  } finally {
    assert.equal(await restricted.stop(), 0);
  }
});

test('no events before authentication; only get/post after; neither disconnects', async () => {
  const socket = await connect('v4-websocket');
  let ack = await emitAck(socket, 'publish', { room: 'admin' });
  assert.equal(ack.body.error.code, '401-1');
  assert.equal(ack.statusCode, 401);
  ack = await sailsAuth(socket, token('timer', 'gate'));
  assert.equal(ack.statusCode, 200);
  ack = await emitAck(socket, 'publish', { room: 'admin' });
  assert.equal(ack.body.error.code, '404-1');
  // A refresh with another identity: 401-2, still connected.
  ack = await sailsAuth(socket, token('timer', 'someone-else'));
  assert.equal(ack.body.error.code, '401-2');
  ack = await sailsAuth(socket, token('timer', 'gate'));
  assert.deepEqual(ack.body.rooms, ['timer']);
  assert.equal(socket.connected, true);
  socket.disconnect();
});

test('a broadcast reaches exactly the sockets in the named rooms, across client versions', async () => {
  const onsite = await connect('v4-websocket'); // assistant
  const handler = await connect('v2-websocket'); // assistant of tournament 2
  const other = await connect('v4-polling'); // assistant of tournament 3
  const timer = await connectSails(); // timer, through sails.io.js
  await sailsAuth(onsite, token('assistant', 'b-onsite'));
  await sailsAuth(handler, token('assistant', 'b-handler'), { tournamentId: 2 });
  await sailsAuth(other, token('assistant', 'b-other'), { tournamentId: 3 });
  const timerAck = await new Promise((res) => timer.get(NS, { 'jwt-api-key': token('timer', 'b-timer') }, res));
  assert.deepEqual(timerAck.rooms, ['timer']);

  const inboxes = {
    onsite: inbox(onsite, 'note'),
    handler: inbox(handler, 'note'),
    other: inbox(other, 'note'),
    timer: inbox(timer._raw, 'note'),
  };
  const send = async (rooms, data) => (await pulso.post('/api/broadcast', { rooms, event: 'note', data })).body;

  assert.deepEqual(await send('assistant_2', 'to-tournament-2'), { recipients: 1 });
  assert.deepEqual(await send(['timer'], 'to-timers'), { recipients: 1 });
  assert.deepEqual(await send(['assistant', 'assistant_2'], 'to-assistants'), { recipients: 3 });
  assert.deepEqual(await send(['assistant', 'timer'], 'to-all'), { recipients: 4 });

  // Each socket's messages, in order: what it should not get is absent
  // because the next message it sees is the following one meant for it.
  assert.equal(await inboxes.handler(), 'to-tournament-2');
  assert.equal(await inboxes.handler(), 'to-assistants');
  assert.equal(await inboxes.handler(), 'to-all');
  assert.equal(await inboxes.timer(), 'to-timers');
  assert.equal(await inboxes.timer(), 'to-all');
  for (const name of ['onsite', 'other']) {
    assert.equal(await inboxes[name](), 'to-assistants', name);
    assert.equal(await inboxes[name](), 'to-all', name);
  }
  for (const s of [onsite, handler, other]) s.disconnect();
  timer.disconnect();
});

test('a socket that never authenticates is closed after socketio.auth_timeout', async () => {
  const quick = await startPulso({ PULSO_SOCKETIO_AUTH_TIMEOUT: '300ms' });
  try {
    const v4 = io4(quick.url + NS, { transports: ['websocket'], reconnection: false });
    const v2 = io2(quick.url + NS, { transports: ['polling'], reconnection: false, forceNew: true });
    await Promise.all([once(v4, 'connect'), once(v2, 'connect')]);
    const [r4, r2] = await Promise.all([disconnectReason(v4), disconnectReason(v2)]);
    assert.equal(r4, 'io server disconnect');
    assert.equal(r2, 'io server disconnect');
  } finally {
    assert.equal(await quick.stop(), 0);
  }
});

test('a server shutdown closes the transport without DISCONNECT, so clients would reconnect', async () => {
  const own = await startPulso();
  const opts = { reconnection: false, forceNew: true };
  const clients = [
    ['v4-websocket', io4(own.url + NS, { ...opts, transports: ['websocket'] })],
    ['v4-polling', io4(own.url + NS, { ...opts, transports: ['polling'] })],
    ['v4-upgrade', io4(own.url + NS, opts)],
    ['v2-websocket', io2(own.url + NS, { ...opts, transports: ['websocket'] })],
    ['v2-polling', io2(own.url + NS, { ...opts, transports: ['polling'] })],
    ['v2-upgrade', io2(own.url + NS, opts)],
  ];
  try {
    await Promise.all(clients.map(([, s]) => once(s, 'connect')));
    for (const [, s] of clients) {
      assert.equal((await sailsAuth(s, token('timer', 'restart'))).statusCode, 200);
    }
    const reasons = Promise.all(clients.map(([, s]) => disconnectReason(s)));
    assert.equal(await own.stop(), 0);
    for (const [i, reason] of (await reasons).entries()) {
      // 'io server disconnect' would keep socket.io from reconnecting.
      assert.ok(['transport close', 'transport error'].includes(reason), `${clients[i][0]}: ${reason}`);
    }
  } finally {
    for (const [, s] of clients) s.close();
    await own.stop();
  }
});

// A real browser on another origin: long-polling needs CORS. Uses the
// machine's Chromium (skipped when there is none).

for (const [lib, file] of [['socket.io-client 4.x', 'socket.io-client/dist/socket.io.min.js'], ['socket.io-client 2.x', 'sio2/dist/socket.io.js']]) {
  test(`${lib} in headless Chromium, cross-origin, over long-polling`, async (t) => {
    const chromium = chromiumOr(t);
    if (!chromium) return;
    const bundle = readFileSync(new URL(`./node_modules/${file}`, import.meta.url));
    const tok = token('assistant', `browser-${lib}`);
    const page = `<html><body><pre id="out">pending</pre><img src="/slow">
<script src="/io.js"></script>
<script>
const out = document.getElementById('out');
const s = io('${pulso.url}${NS}', { transports: ['polling'], withCredentials: true, reconnection: false });
s.on('connect_error', (e) => { out.textContent = 'connect_error ' + e.message; });
s.on('connect', () => s.emit('get', { url: '${NS}', params: { 'jwt-api-key': '${tok}', tournamentId: 2 } },
  (ack) => { out.textContent = 'ACK ' + JSON.stringify({ ack, id: s.id }); }));
</script></body></html>`;
    const { ack, id } = await runPage(chromium, page, 'ACK', { '/io.js': ['text/javascript', bundle] });
    assert.deepEqual(ack, { body: { socketId: id, rooms: ['assistant', 'assistant_2'] }, statusCode: 200 });
  });
}
