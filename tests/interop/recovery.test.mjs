// Socket.IO connection state recovery (SPEC §11) with the real
// socket.io-client 4.8: the client is told a pid, keeps the offset that ends
// every tracked event, and when its TCP connection is cut (no DISCONNECT,
// no close frame) it reconnects with {pid, offset} and sees
// `socket.recovered === true`, its old `socket.id`, the events it missed in
// order, then live ones. Without history, after `history.ttl`, or with a pid
// the server does not know, it connects as new. The same in headless
// Chromium with the client's browser build, its transport closed under it
// (`socket.io.engine.close()`, as socket.io's documentation shows).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { io } from 'socket.io-client';
import { pulsoForFile, startPulso, token, once, until, runPage } from './lib/pulso.mjs';
import { NS } from './lib/clients.mjs';
import { chromiumOr } from './lib/services.mjs';

const HISTORY = { PULSO_HISTORY_TOPICS: 'assistant,assistant_2,assistant_3' };
const { pulso, opened } = pulsoForFile(HISTORY);

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

// ---------------------------------------------------------------- browser

/**
 * A page that runs `body` (an async function body with `io`, `URL`, `TOKEN`,
 * `N` and the helpers below in scope) with socket.io-client's browser build,
 * and writes `RESULT <json>` or `ERROR <message>`. Its load event (and so
 * the DOM dump) waits for `/hold`, which the test answers once the page
 * has reported.
 */
function recoveryPage(body, vars) {
  return `<html><body><pre id="out">pending</pre>
<script src="/io.js"></script>
<script>
const URL = ${JSON.stringify(vars.url)};
const TOKEN = ${JSON.stringify(vars.token)};
const N = ${vars.n};
const out = (text) => { document.getElementById('out').textContent = text; };
const until = async (what, check, ms = 10000) => {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error('timed out waiting for ' + what);
    await new Promise((r) => setTimeout(r, 20));
  }
};
const event = (socket, name) => new Promise((resolve) => socket.once(name, (...a) => resolve(a)));
(async () => { ${body} })()
  .then((r) => out('RESULT ' + JSON.stringify(r)), (e) => out('ERROR ' + e.message))
  .finally(() => fetch('/done'));
</script>
<img src="/hold">
</body></html>`;
}

/**
 * Runs a recovery page against `server`: `/publish` broadcasts `check_in`
 * 0 to `assistant_2`; `/away` broadcasts 1..n, once the server keeps the
 * page's session when `waitKept` (when the page reconnects by itself, it
 * may have taken its session back already). Returns what the page reported.
 */
async function runRecoveryPage(t, server, sub, n, waitKept, body) {
  const chromium = chromiumOr(t);
  if (!chromium) return null;
  const bundle = readFileSync(new URL('./node_modules/socket.io-client/dist/socket.io.min.js', import.meta.url));
  const before = await kept(server);
  let release;
  const done = new Promise((r) => { release = r; });
  const guard = setTimeout(release, 25000);
  const answer = (res, status, text) => {
    res.writeHead(status, { 'content-type': 'text/plain' });
    res.end(text);
  };
  const handlers = {
    '/io.js': ['text/javascript', bundle],
    '/publish': async (req, res) => {
      answer(res, 200, String(await broadcast(server, ['assistant_2'], 0)));
    },
    '/away': async (req, res) => {
      try {
        if (waitKept) await until('the session kept', async () => (await kept(server)) === before + 1);
        for (let i = 1; i <= n; i++) await broadcast(server, ['assistant_2'], i);
        answer(res, 200, 'published');
      } catch (e) {
        answer(res, 500, e.message);
      }
    },
    '/done': (req, res) => {
      release();
      answer(res, 200, 'ok');
    },
    '/hold': async (req, res) => {
      await done;
      answer(res, 200, '');
    },
  };
  const page = recoveryPage(body, { url: server.url, token: token('assistant', sub), n });
  try {
    return await runPage(chromium, page, 'RESULT', handlers);
  } finally {
    clearTimeout(guard);
  }
}

// What every page does first: connects, authenticates as an assistant of
// tournament 2 (rooms assistant, assistant_2), records every check_in with
// its offset, and has the test publish event 0, which gives it an offset.
const CONNECT_AND_AUTHENTICATE = (options) => `
  const socket = io(URL + '/notifications', ${options});
  const got = [];
  socket.on('check_in', (data, offset) => got.push([data, offset]));
  await event(socket, 'connect');
  const first = { id: socket.id, recovered: socket.recovered };
  const ack = await socket.timeout(5000).emitWithAck('get', {
    url: '/notifications', params: { 'jwt-api-key': TOKEN, tournamentId: 2 } });
  if (ack.statusCode !== 200) throw new Error('get /notifications: ' + JSON.stringify(ack));
  await fetch('/publish');
  await until('event 0', () => got.length === 1);
`;

test('headless Chromium: the transport closed under it, the page recovers the events published meanwhile', async (t) => {
  const N = 30;
  const r = await runRecoveryPage(t, pulso, 'browser-ws', N, true, `
    ${CONNECT_AND_AUTHENTICATE("{ transports: ['websocket'], reconnection: false }")}
    const gone = event(socket, 'disconnect');
    socket.io.engine.close();
    const [reason] = await gone;
    // Published while the page is away: every one of them is missed.
    const away = await fetch('/away');
    if (!away.ok) throw new Error('/away: ' + await away.text());
    const back = event(socket, 'connect');
    socket.connect();
    await back;
    const recovered = socket.recovered;
    const sameId = socket.id === first.id;
    await until('the missed events', () => got.length === N + 1);
    socket.close();
    return { first, reason, recovered, sameId, got };
  `);
  if (!r) return;
  assert.equal(r.first.recovered, false, 'a first connection is not a recovery');
  assert.equal(r.reason, 'forced close');
  assert.equal(r.recovered, true);
  assert.ok(r.sameId, 'the same socket.id');
  assert.deepEqual(r.got.map((a) => a[0]), [...Array(N + 1).keys()]);
  const seqs = r.got.map((a) => Number(a[1].split(':')[1]));
  assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), `offsets grow: ${seqs}`);
});

test("headless Chromium: polling then upgrade, the client's own reconnection recovers", async (t) => {
  const N = 30;
  const r = await runRecoveryPage(t, pulso, 'browser-upgrade', N, false, `
    // The browser's default: long-polling first, then the upgrade.
    ${CONNECT_AND_AUTHENTICATE('{ reconnectionDelay: 500, randomizationFactor: 0 }')}
    await until('the upgrade', () => socket.io.engine.transport.name === 'websocket');
    const back = event(socket, 'connect');
    socket.io.engine.close();
    // Published while the page is away or coming back: each arrives once,
    // in order, replayed or live.
    const away = await fetch('/away');
    if (!away.ok) throw new Error('/away: ' + await away.text());
    await back;
    const recovered = socket.recovered;
    const sameId = socket.id === first.id;
    await until('every event', () => got.length === N + 1);
    socket.close();
    return { first, recovered, sameId, got };
  `);
  if (!r) return;
  assert.equal(r.first.recovered, false);
  assert.equal(r.recovered, true);
  assert.ok(r.sameId, 'the same socket.id');
  assert.deepEqual(r.got.map((a) => a[0]), [...Array(N + 1).keys()]);
});
