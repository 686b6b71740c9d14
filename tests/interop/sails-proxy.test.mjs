// A real Sails 1.x application (`sails-app/`: sails with sails-hook-sockets,
// as `sails new` makes them) and one page's logic, run unchanged against
// the app alone and against pulso in front of it (`socketio.proxy_url`,
// SPEC §4): authenticate, `get /tournament/2` (which joins the socket to
// the tournament's room), `post /checkin` with data (which broadcasts to
// that room). Clients: sails.io.js on socket.io-client 2.x, and plain
// socket.io-client 4.x and 2.x sending what sails.io.js sends.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import sailsIOClient from 'sails.io.js';
import io2 from 'sio2';
import { io as io4 } from 'socket.io-client';
import { startPulso, freePort, token, until, SECRET } from './lib/pulso.mjs';

const require = createRequire(import.meta.url);
const { lift } = require('./sails-app/app.js');

const API_KEY = 'interop-sails-key';
let app;
let appUrl;
let pulso;

before(async () => {
  const port = await freePort();
  app = await lift({ port, jwtSecret: SECRET, pulsoKey: API_KEY });
  appUrl = `http://127.0.0.1:${port}`;
  pulso = await startPulso({
    PULSO_SOCKETIO_PROXY_URL: appUrl,
    PULSO_SOCKETIO_PROXY_ROOMS: 'true',
    PULSO_API_KEY: API_KEY,
  });
  // The app broadcasts through pulso's API too, once it is there.
  app.config.custom.pulsoUrl = pulso.url;
});

const opened = [];
after(async () => {
  for (const close of opened) close();
  assert.equal(await pulso.stop(), 0);
  await new Promise((r) => app.lower(r));
});

// sails.io.js augments the io function it is given, once.
let sailsIo;

/** A client: `request(method, url, data)` resolves with {body, statusCode}; `next(event)` with the event's data. */
async function client(kind, url) {
  if (kind === 'sails.io.js') {
    if (!sailsIo) {
      sailsIo = sailsIOClient(io2);
      sailsIo.sails.autoConnect = false;
      sailsIo.sails.environment = 'production'; // no console banners
      sailsIo.sails.reconnection = false;
    }
    const socket = sailsIo.sails.connect(url, { multiplex: false });
    opened.push(() => socket.isConnected() && socket.disconnect());
    await until('sails.io.js connected', () => socket.isConnected());
    return {
      request: (method, u, data) =>
        new Promise((resolve) =>
          socket.request({ method, url: u, data }, (body, jwr) => resolve({ body, statusCode: jwr.statusCode }))),
      next: (event) => new Promise((resolve) => socket.on(event, resolve)),
    };
  }
  const lib = kind === 'socket.io-client 4' ? io4 : io2;
  // WebSocket only, like sails.io.js: a Sails 1.x app serves no polling
  // unless its `sockets.transports` says so. The query is sails.io.js's
  // too: without an SDK version, Sails refuses every virtual request.
  const socket = lib(url, {
    transports: ['websocket'],
    query: { __sails_io_sdk_version: '1.2.1', __sails_io_sdk_platform: 'node', __sails_io_sdk_language: 'javascript' },
    reconnection: false,
    forceNew: true,
  });
  opened.push(() => socket.close());
  await new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('connect_error', reject);
  });
  return {
    // What sails.io.js emits: the method as the event, {method, headers, data, url}.
    request: (method, u, data) =>
      new Promise((resolve) =>
        socket.emit(method, { method, headers: {}, data, url: u }, (jwr) =>
          resolve({ body: jwr.body, statusCode: jwr.statusCode }))),
    next: (event) => new Promise((resolve) => socket.once(event, resolve)),
  };
}

/** The page's logic, written once for whichever server holds the socket. */
async function page(c, tok) {
  const auth = await c.request('get', '/notifications', { 'jwt-api-key': tok });
  const tournament = await c.request('get', '/tournament/2');
  const heard = c.next('checkin');
  const checkin = await c.request('post', '/checkin', { tournamentId: 2, nick: 'aguila_calva' });
  return { auth, tournament, checkin, heard: await heard };
}

function assertPage(r, where) {
  assert.equal(r.auth.statusCode, 200, `${where}: ${JSON.stringify(r.auth)}`);
  assert.ok(r.auth.body.rooms.includes('assistant'), where);
  assert.equal(typeof r.auth.body.socketId, 'string');
  assert.deepEqual(r.tournament, {
    statusCode: 200,
    body: { id: 2, name: 'Tournament 2', viewer: { sub: '7', role: 'assistant' } },
  }, where);
  const checkin = { tournamentId: 2, nick: 'aguila_calva', by: '7' };
  assert.deepEqual(r.checkin, { statusCode: 201, body: { checkin } }, where);
  assert.deepEqual(r.heard, { check_in_id: checkin }, where);
}

async function proxied() {
  const m = /pulso_socketio_proxy_requests_total\{status="(\d+)"\} (\d+)/g;
  const counts = {};
  for (const [, status, n] of (await (await fetch(`${pulso.url}/metrics`)).text()).matchAll(m)) counts[status] = Number(n);
  return counts;
}

for (const kind of ['sails.io.js', 'socket.io-client 4', 'socket.io-client 2']) {
  test(`${kind}: the same page works against the Sails app alone and behind pulso`, async () => {
    const tok = token('assistant', '7');
    const alone = await page(await client(kind, appUrl), tok);
    assertPage(alone, 'Sails alone');

    const before = await proxied();
    const fronted = await page(await client(kind, pulso.url), tok);
    assertPage(fronted, 'behind pulso');
    const after = await proxied();
    // The two app requests went through pulso (the auth is pulso's own).
    assert.equal((after['200'] || 0) - (before['200'] || 0), 1, JSON.stringify(after));
    assert.equal((after['201'] || 0) - (before['201'] || 0), 1, JSON.stringify(after));
  });
}

test('behind pulso: errors of the app come back as the app made them, and a page that has not authenticated gets no identity', async () => {
  const c = await client('sails.io.js', pulso.url);
  const bad = await c.request('get', '/tournament/x');
  assert.equal(bad.statusCode, 400);
  assert.deepEqual(bad.body, { error: { code: '400-1', message: 'bad id' } });
  const anonymous = await c.request('post', '/checkin', { tournamentId: 2, nick: 'x' });
  assert.equal(anonymous.statusCode, 401);
  assert.equal(anonymous.body.error.code, '401-1');
  const missing = await c.request('get', '/no/such/route');
  assert.equal(missing.statusCode, 404);
});

test('behind pulso over long-polling: forwarded answers reach a polling socket', async () => {
  const socket = io4(pulso.url, { transports: ['polling'], reconnection: false, forceNew: true });
  opened.push(() => socket.close());
  await new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('connect_error', reject);
  });
  const ask = (method, url, data) =>
    new Promise((resolve) => socket.emit(method, { method, headers: {}, data, url }, resolve));
  const auth = await ask('get', '/notifications', { 'jwt-api-key': token('assistant', '8') });
  assert.equal(auth.statusCode, 200);
  const tournament = await ask('get', '/tournament/3');
  assert.equal(tournament.statusCode, 200);
  assert.deepEqual(tournament.body.viewer, { sub: '8', role: 'assistant' });
  const heard = new Promise((resolve) => socket.once('checkin', resolve));
  const checkin = await ask('post', '/checkin', { tournamentId: 3, nick: 'x' });
  assert.equal(checkin.statusCode, 201);
  assert.deepEqual(await heard, { check_in_id: { tournamentId: 3, nick: 'x', by: '8' } });
});
