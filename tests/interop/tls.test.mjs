// One pulso behind nginx with TLS, configured by the committed
// deploy/nginx/pulso-tls.conf (docs/deployment.md): a throw-away
// self-signed certificate made with openssl, Debian's nginx, the real
// binary. Every client goes through nginx over TLS and checks the
// certificate against that one (no `rejectUnauthorized: false`): the npm
// `ws` client on wss:///ws, socket.io-client 4 over WebSocket and over
// long-polling then upgrading, and the HTTP API over https.
//
// Skipped when nginx or openssl is missing, except under
// PULSO_REQUIRE_SERVICES=1 (.ci/run), where that is a failure.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { request as httpsRequest } from 'node:https';
import { get as httpGet } from 'node:http';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { io } from 'socket.io-client';
import WebSocket from 'ws';
import { freePort, once, startPulso, token, until } from './lib/pulso.mjs';
import { NS, closeAll, queueJson, sailsAuth } from './lib/clients.mjs';
import { findBinaries, nginxDir, presentOr, selfSignedCert, startNginx } from './lib/services.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const CONF = resolve(here, '../../deploy/nginx/pulso-tls.conf');

/**
 * The committed config with only the lines an operator edits replaced: the
 * upstream's `server` line, the two `listen` lines, the certificate paths
 * and the access log's path. Each must be there, so an edit that drops one
 * fails here rather than testing some other config.
 */
function renderConfig(text, { upstream, httpListen, httpsListen, cert, key, accessLog }) {
  const lines = text.split('\n');
  const find = (re) => lines.flatMap((l, i) => (re.test(l) ? [i] : []));
  const replace = (re, what, make) => {
    const at = find(re);
    assert.equal(at.length, 1, `pulso-tls.conf: one ${what} line`);
    const indent = /^\s*/.exec(lines[at[0]])[0];
    lines[at[0]] = `${indent}${make}`;
  };
  replace(/^\s*server\s+[\w.-]+:\d+\s*;\s*$/, '`server host:port;` (upstream)', `server ${upstream};`);
  replace(/^\s*listen\s+80\s*;\s*$/, '`listen 80;`', `listen ${httpListen};`);
  replace(/^\s*listen\s+443\s+ssl\s*;\s*$/, '`listen 443 ssl;`', `listen ${httpsListen} ssl;`);
  replace(/^\s*ssl_certificate\s+\S+\s*;\s*$/, '`ssl_certificate <path>;`', `ssl_certificate ${cert};`);
  replace(/^\s*ssl_certificate_key\s+\S+\s*;\s*$/, '`ssl_certificate_key <path>;`', `ssl_certificate_key ${key};`);
  replace(/^\s*access_log\s+\S+\s+pulso\s*;\s*$/, '`access_log <path> pulso;`', `access_log ${accessLog} pulso;`);
  return lines.join('\n');
}

/** An HTTPS request through nginx, trusting only the test's certificate. */
function https(url, { method = 'GET', body, bearer, ca }) {
  return new Promise((res, rej) => {
    const req = httpsRequest(url, {
      method,
      ca,
      headers: {
        'content-type': 'application/json',
        ...(bearer ? { authorization: `Bearer ${bearer}` } : {}),
      },
    }, (r) => {
      let text = '';
      r.on('data', (d) => (text += d));
      r.on('end', () => {
        let json;
        try { json = JSON.parse(text); } catch { json = text; }
        res({ status: r.statusCode, headers: r.headers, body: json });
      });
    });
    req.on('error', rej);
    req.setTimeout(5000, () => req.destroy(new Error(`no answer from ${url}`)));
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}

let missing = null;
let pulso;
let nginx; // the service (startNginx) and its httpsUrl, httpUrl
let ca;
const opened = [];

before(async () => {
  const { bins, missing: absent } = findBinaries('nginx', 'openssl');
  missing = absent;
  if (missing) return;

  const dir = nginxDir('nginx-tls');
  const cert = join(dir, 'cert.pem');
  const key = join(dir, 'key.pem');
  selfSignedCert(bins.openssl, { cert, key, cn: 'pulso-test' });
  ca = readFileSync(cert);

  pulso = await startPulso({ PULSO_DATABASE_URL: 'sqlite::memory:' });
  const [httpPort, httpsPort] = [await freePort(), await freePort()];
  writeFileSync(join(dir, 'pulso.conf'), renderConfig(readFileSync(CONF, 'utf8'), {
    upstream: `127.0.0.1:${pulso.port}`,
    httpListen: `127.0.0.1:${httpPort}`,
    httpsListen: `127.0.0.1:${httpsPort}`,
    cert,
    key,
    accessLog: join(dir, 'access.log'),
  }));
  const httpsUrl = `https://127.0.0.1:${httpsPort}`;
  nginx = await startNginx(bins.nginx, dir, 'nginx proxying /healthz over TLS',
    async () => (await https(`${httpsUrl}/healthz`, { ca })).status === 200);
  nginx.httpsUrl = httpsUrl;
  nginx.httpUrl = `http://127.0.0.1:${httpPort}`;
});

after(async () => {
  closeAll(opened);
  const errors = [];
  if (nginx) {
    const { code, signal } = await nginx.stop(); // and removes its directory
    if (!(code === 0 || signal === 'SIGTERM')) errors.push(new Error(`nginx stopped: ${signal ?? code}\n${nginx.logs()}`));
  }
  if (pulso) {
    const code = await pulso.stop();
    if (code !== 0) errors.push(new Error(`pulso exits 0 on SIGTERM, got ${code}\n${pulso.logs()}`));
  }
  if (errors.length) throw errors[0];
});

const admin = () => token('admin', 'tls-admin');

test('the committed config: TLS on 443, plain HTTP redirected, WebSocket headers, read timeout above keepalive_interval', () => {
  const conf = readFileSync(CONF, 'utf8').replace(/#.*$/gm, '');
  assert.match(conf, /listen\s+443\s+ssl\s*;/);
  assert.match(conf, /ssl_protocols\s+TLSv1\.2\s+TLSv1\.3\s*;/);
  assert.match(conf, /return\s+301\s+https:\/\/\$host\$request_uri\s*;/);
  assert.match(conf, /proxy_http_version\s+1\.1\s*;/);
  assert.match(conf, /proxy_set_header\s+Upgrade\s+\$http_upgrade\s*;/);
  assert.match(conf, /proxy_set_header\s+Connection\s+\$connection_upgrade\s*;/);
  const [, seconds] = /proxy_read_timeout\s+(\d+)s\s*;/.exec(conf) ?? [];
  assert.ok(Number(seconds) > 30, `proxy_read_timeout ${seconds}s is above keepalive_interval (30 s)`);
});

test('plain HTTP is redirected to HTTPS', async (t) => {
  if (!presentOr(t, missing)) return;
  const res = await new Promise((ok, fail) => {
    httpGet(`${nginx.httpUrl}/ws?token=x`, (r) => { r.resume(); ok(r); }).on('error', fail);
  });
  assert.equal(res.statusCode, 301);
  assert.match(res.headers.location, /^https:\/\/127\.0\.0\.1(:\d+)?\/ws\?token=x$/);
});

test('a client that does not trust the certificate is refused', async (t) => {
  if (!presentOr(t, missing)) return;
  const ws = new WebSocket(`${nginx.httpsUrl.replace('https', 'wss')}/ws?token=${token('assistant', 'tls-0')}`);
  const err = await once(ws, 'error');
  assert.match(String(err.code ?? err.message), /SELF_SIGNED|self.signed/i);
});

test('/ws over wss:// through nginx: subscribe, get a publish made over https://', async (t) => {
  if (!presentOr(t, missing)) return;
  const topic = 'tls/ws';
  const ws = queueJson(new WebSocket(`${nginx.httpsUrl.replace('https', 'wss')}/ws?token=${token('assistant', 'tls-1')}`, { ca }));
  opened.push(ws);
  await once(ws, 'open');
  assert.equal(ws._socket.getProtocol(), 'TLSv1.3');
  ws.sendJson({ type: 'sub', topic, id: 1 });
  await ws.until((m) => m.type === 'ack' && m.id === 1);
  const res = await https(`${nginx.httpsUrl}/api/publish`, { method: 'POST', body: { topic, payload: { over: 'tls' } }, bearer: admin(), ca });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.equal(res.body.recipients, 1);
  assert.equal(res.headers['strict-transport-security'], 'max-age=31536000');
  assert.deepEqual((await ws.until((m) => m.topic === topic)).payload, { over: 'tls' });
  ws.close();
  // The access log has the request, not its token.
  await until('the /ws request in the access log', () => nginx.accessLog().includes('"GET /ws HTTP/1.1" 101'));
  assert.ok(!nginx.accessLog().includes('token='), 'no token in the access log');
});

for (const transports of [['websocket'], ['polling', 'websocket']]) {
  test(`socket.io-client 4 over TLS (${transports.join(' then ')}): authenticates and gets a broadcast`, async (t) => {
    if (!presentOr(t, missing)) return;
    const socket = io(nginx.httpsUrl + NS, { transports, ca, reconnection: false, forceNew: true });
    opened.push(socket);
    await once(socket, 'connect');
    const ack = await sailsAuth(socket, token('assistant', `tls-sio-${transports.length}`), { tournamentId: 2 });
    assert.deepEqual(ack, { body: { socketId: socket.id, rooms: ['assistant', 'assistant_2'] }, statusCode: 200 });
    if (transports.length > 1) {
      await until('upgraded to WebSocket through nginx', () => socket.io.engine.transport.name === 'websocket');
    }
    const got = once(socket, 'note');
    const res = await https(`${nginx.httpsUrl}/api/broadcast`, { method: 'POST', body: { rooms: 'assistant_2', event: 'note', data: { n: transports.length } }, bearer: admin(), ca });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.deepEqual(await got, { n: transports.length });
    assert.equal(socket.io.engine.transport.name, 'websocket');
    socket.disconnect();
  });
}
