// pulso serving TLS itself (PULSO_TLS_CERT_FILE, PULSO_TLS_KEY_FILE), no
// proxy in front: two throw-away self-signed certificates made with
// openssl, the real binary. Every client trusts those certificates only
// (no `rejectUnauthorized: false`): the npm `ws` client on wss:///ws,
// socket.io-client 4 over WebSocket and over long-polling then upgrading,
// the HTTP API over https. Then the certificate files are replaced and
// pulso is sent SIGHUP: a new connection gets the new certificate while a
// socket.io-client connected before keeps working.
//
// Skipped when openssl is missing, except under PULSO_REQUIRE_SERVICES=1
// (.ci/run), where that is a failure.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdtempSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { connect as tlsConnect } from 'node:tls';
import { X509Certificate } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { io } from 'socket.io-client';
import WebSocket from 'ws';
import { once, startPulso, token, until } from './lib/pulso.mjs';
import { NS, closeAll, queueJson, sailsAuth } from './lib/clients.mjs';
import { findBinaries, presentOr, selfSignedCert } from './lib/services.mjs';


let missing = null;
let pulso;
let dir;
let ca; // both certificates: a client trusts either
const certs = {}; // name -> { cert, key } paths
const opened = [];

/** Replaces `to` with a copy of `from` in one rename. */
function replace(from, to) {
  copyFileSync(from, `${to}.tmp`);
  renameSync(`${to}.tmp`, to);
}

/** The SHA-256 fingerprint of the certificate a new TLS connection gets. */
function presentedFingerprint(port) {
  return new Promise((res, rej) => {
    const socket = tlsConnect({ host: '127.0.0.1', port, ca, ALPNProtocols: ['http/1.1'] }, () => {
      const fp = socket.getPeerX509Certificate().fingerprint256;
      socket.end();
      res(fp);
    });
    socket.on('error', rej);
    socket.setTimeout(5000, () => socket.destroy(new Error('no TLS handshake in time')));
  });
}

before(async () => {
  const { bins, missing: absent } = findBinaries('openssl');
  missing = absent;
  if (missing) return;
  dir = mkdtempSync(join(tmpdir(), 'pulso-wss-'));
  for (const name of ['a', 'b']) {
    const cert = join(dir, `${name}.crt`);
    const key = join(dir, `${name}.key`);
    selfSignedCert(bins.openssl, { cert, key, cn: `pulso-wss-${name}` });
    certs[name] = { cert, key, fingerprint: new X509Certificate(readFileSync(cert)).fingerprint256 };
  }
  ca = [readFileSync(certs.a.cert), readFileSync(certs.b.cert)];
  // The files pulso reads: certificate a for now.
  replace(certs.a.cert, join(dir, 'live.crt'));
  replace(certs.a.key, join(dir, 'live.key'));
  pulso = await startPulso({
    PULSO_DATABASE_URL: 'sqlite::memory:',
    PULSO_TLS_CERT_FILE: join(dir, 'live.crt'),
    PULSO_TLS_KEY_FILE: join(dir, 'live.key'),
  }, { ca });
});

after(async () => {
  closeAll(opened);
  let error;
  if (pulso) {
    const code = await pulso.stop();
    if (code !== 0) error = new Error(`pulso exits 0 on SIGTERM, got ${code}\n${pulso.logs()}`);
  }
  if (dir) rmSync(dir, { recursive: true, force: true });
  if (error) throw error;
});

test('a client that does not trust the certificate is refused', async (t) => {
  if (!presentOr(t, missing)) return;
  const ws = new WebSocket(`${pulso.wsUrl}?token=${token('assistant', 'wss-0')}`);
  const err = await once(ws, 'error');
  assert.match(String(err.code ?? err.message), /SELF_SIGNED|self.signed/i);
});

test('/ws over wss:// served by pulso: subscribe, get a publish made over https://', async (t) => {
  if (!presentOr(t, missing)) return;
  const topic = 'wss/ws';
  const ws = queueJson(new WebSocket(`${pulso.wsUrl}?token=${token('assistant', 'wss-1')}`, { ca }));
  opened.push(ws);
  await once(ws, 'open');
  assert.equal(ws._socket.getProtocol(), 'TLSv1.3');
  assert.equal(ws._socket.getPeerX509Certificate().fingerprint256, certs.a.fingerprint);
  ws.sendJson({ type: 'sub', topic, id: 1 });
  await ws.until((m) => m.type === 'ack' && m.id === 1);
  const res = await pulso.post('/api/publish', { topic, payload: { over: 'tls' } });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.equal(res.body.recipients, 1);
  assert.deepEqual((await ws.until((m) => m.topic === topic)).payload, { over: 'tls' });
  ws.close();
});

/** A socket.io-client 4 socket authenticated with a Sails `get`, in rooms assistant and assistant_<n>. */
async function sioClient(transports, n) {
  const socket = io(pulso.url + NS, { transports, ca, reconnection: false, forceNew: true });
  opened.push(socket);
  await once(socket, 'connect');
  const ack = await sailsAuth(socket, token('assistant', `wss-sio-${n}`), { tournamentId: n });
  assert.deepEqual(ack, { body: { socketId: socket.id, rooms: ['assistant', `assistant_${n}`] }, statusCode: 200 });
  if (transports.length > 1) {
    await until('upgraded to WebSocket over TLS', () => socket.io.engine.transport.name === 'websocket');
  }
  return socket;
}

/** Broadcasts `data` as `note` to room assistant_<n> and checks `socket` gets it. */
async function broadcastReaches(socket, n, data) {
  const got = once(socket, 'note');
  const res = await pulso.post('/api/broadcast', { rooms: `assistant_${n}`, event: 'note', data });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.deepEqual(await got, data);
}

for (const transports of [['websocket'], ['polling', 'websocket']]) {
  test(`socket.io-client 4 over TLS served by pulso (${transports.join(' then ')}): authenticates and gets a broadcast`, async (t) => {
    if (!presentOr(t, missing)) return;
    const n = 10 + transports.length;
    const socket = await sioClient(transports, n);
    await broadcastReaches(socket, n, { n });
    assert.equal(socket.io.engine.transport.name, 'websocket');
    socket.disconnect();
  });
}

test('SIGHUP with new certificate files: new connections get the new certificate, a connected socket.io client keeps working', async (t) => {
  if (!presentOr(t, missing)) return;
  const socket = await sioClient(['websocket'], 20);
  assert.equal(await presentedFingerprint(pulso.port), certs.a.fingerprint);
  replace(certs.b.key, join(dir, 'live.key'));
  replace(certs.b.cert, join(dir, 'live.crt'));
  process.kill(pulso.pid, 'SIGHUP');
  await until('a new connection gets certificate b', async () => (await presentedFingerprint(pulso.port)) === certs.b.fingerprint);
  await until('the reload in the log', () => pulso.logs().includes('TLS certificate reloaded'));
  // The socket connected with certificate a: still connected, still served.
  assert.equal(socket.connected, true);
  await broadcastReaches(socket, 20, { after: 'reload' });
  const ack = await sailsAuth(socket, token('assistant', 'wss-sio-20'), { tournamentId: 20 });
  assert.equal(ack.statusCode, 200, JSON.stringify(ack));
  // And a new socket.io client connects with certificate b.
  const fresh = await sioClient(['websocket'], 22);
  await broadcastReaches(fresh, 22, { fresh: true });
  socket.disconnect();
  fresh.disconnect();
});
