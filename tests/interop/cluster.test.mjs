// Two pulso nodes of one cluster behind nginx, configured by the committed
// deploy/nginx/pulso.conf (docs/cluster.md, "Behind nginx"; SPEC §8): a
// private redis-server, the shared PostgreSQL, the real binary twice, and
// nginx in front. Every client goes through nginx only: socket.io-client
// 4.x and 2.x over each transport, /ws with the npm `ws` client. Clients
// from different loopback source addresses (127.0.0.2, 127.0.0.3, ...) are
// spread over both nodes by the upstream's hash of the client address.
//
// Skipped when nginx, redis-server or PostgreSQL is missing, except under
// PULSO_REQUIRE_SERVICES=1 (.ci/run), where that is a failure.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { Agent, get as httpGet } from 'node:http';
import { connect as netConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { io as io4 } from 'socket.io-client';
import io2 from 'sio2';
import WebSocket from 'ws';
import { freePort, once, startPulso, token, until } from './lib/pulso.mjs';
import { NS, closeAll, queueJson, sailsAuth } from './lib/clients.mjs';
import { findBinaries, forget, killOnExit, nginxDir, presentOr, spawnService, startNginx } from './lib/services.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const CONF = resolve(here, '../../deploy/nginx/pulso.conf');
const KINDS = ['v4-polling', 'v4-websocket', 'v4-upgrade', 'v2-polling', 'v2-websocket', 'v2-upgrade'];
const PG_URL = process.env.PULSO_TEST_POSTGRES_URL || 'postgres://postgres@127.0.0.1:5432/test';
// Unique per run: channels, node ids and presence subs of earlier runs
// (or of other clusters sharing the database) never mix with these.
const RUN = `nginx-${process.pid}-${Date.now().toString(36)}`;

// ---------------------------------------------------------------- services

/** True when a PostgreSQL server answers at `url` (its SSLRequest reply). */
function postgresAnswers(url) {
  const { hostname, port } = new URL(url);
  return new Promise((res) => {
    const sock = netConnect({ host: hostname || '127.0.0.1', port: Number(port) || 5432 });
    const done = (ok) => { clearTimeout(t); sock.destroy(); res(ok); };
    const t = setTimeout(() => done(false), 3000);
    sock.on('error', () => done(false));
    sock.on('connect', () => sock.write(Buffer.from([0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])));
    sock.on('data', (d) => done(d[0] === 0x4e || d[0] === 0x53)); // 'N' or 'S'
  });
}

/** Resolves true when a Redis server on `port` answers PING. */
function redisPong(port) {
  return new Promise((res) => {
    const sock = netConnect({ host: '127.0.0.1', port });
    const done = (ok) => { sock.destroy(); res(ok); };
    sock.on('error', () => done(false));
    sock.on('connect', () => sock.write('PING\r\n'));
    sock.on('data', (d) => done(d.toString().startsWith('+PONG')));
  });
}

async function startRedis(bin) {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'pulso-redis-'));
  const redis = spawnService(bin, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { cwd: dir });
  await until('redis-server answering PING', async () => {
    if (!redis.running()) throw new Error(`redis-server exited:\n${redis.logs()}`);
    return redisPong(port);
  }, 10000);
  return { ...redis, url: `redis://127.0.0.1:${port}` };
}

/**
 * The committed config with only the lines an operator edits replaced: the
 * upstream's `server` lines, the `listen` line and the access log's path.
 * Each must be there, so an edit that drops one fails here rather than
 * testing some other config.
 */
function renderConfig(text, { servers, listen, accessLog }) {
  const lines = text.split('\n');
  const find = (re) => lines.flatMap((l, i) => (re.test(l) ? [i] : []));
  const upstreamServers = find(/^\s*server\s+[\w.-]+:\d+\s*;\s*$/);
  const listens = find(/^\s*listen\s+80\s*;\s*$/);
  const logs = find(/^\s*access_log\s+\S+\s+pulso\s*;\s*$/);
  assert.ok(upstreamServers.length >= 1, 'pulso.conf: the upstream lists its nodes as `server host:port;` lines');
  assert.equal(listens.length, 1, 'pulso.conf: one `listen 80;` line');
  assert.equal(logs.length, 1, 'pulso.conf: one `access_log <path> pulso;` line');
  const indent = (i) => /^\s*/.exec(lines[i])[0];
  lines[listens[0]] = `${indent(listens[0])}listen ${listen};`;
  lines[logs[0]] = `${indent(logs[0])}access_log ${accessLog} pulso;`;
  const first = upstreamServers[0];
  const replaced = servers.map((s) => `${indent(first)}server ${s};`).join('\n');
  for (const i of upstreamServers.slice(1).reverse()) lines.splice(i, 1);
  lines[first] = replaced;
  return lines.join('\n');
}

/** nginx on a free port with the committed config in front of `servers`. */
async function nginxInFront(bin, servers) {
  const dir = nginxDir('nginx');
  const port = await freePort();
  writeFileSync(join(dir, 'pulso.conf'), renderConfig(readFileSync(CONF, 'utf8'), {
    servers,
    listen: `127.0.0.1:${port}`,
    accessLog: join(dir, 'access.log'),
  }));
  const url = `http://127.0.0.1:${port}`;
  const nginx = await startNginx(bin, dir, 'nginx proxying /healthz', async () => (await fetch(`${url}/healthz`)).ok);
  return { ...nginx, url, wsUrl: `ws://127.0.0.1:${port}/ws` };
}

// ------------------------------------------------------------------ set-up

let missing = null; // why the cluster cannot run on this machine
let nginx;
let nodes = []; // [a, b], each with .id
const cleanups = [];

before(async () => {
  const { bins, missing: absent } = findBinaries('nginx', 'redis-server');
  missing = absent;
  if (!missing && !(await postgresAnswers(PG_URL))) missing = `PostgreSQL at ${PG_URL} is unreachable`;
  if (missing) return;

  const redis = await startRedis(bins['redis-server']);
  cleanups.push(async () => {
    const { signal, code } = await redis.stop();
    assert.ok(signal === 'SIGTERM' || code === 0, `redis-server stopped: ${signal ?? code}\n${redis.logs()}`);
  });
  for (const id of ['a', 'b']) {
    const nodeId = `interop-${RUN}-${id}`;
    const node = await startPulso({
      PULSO_CLUSTER_REDIS_URL: redis.url,
      PULSO_CLUSTER_PREFIX: `interop-${RUN}`,
      PULSO_DATABASE_URL: PG_URL,
      PULSO_NODE_ID: nodeId,
    });
    node.id = nodeId;
    nodes.push(node);
    killOnExit(node.pid, 'SIGKILL');
    cleanups.push(async () => {
      const code = await node.stop();
      forget(node.pid);
      assert.equal(code, 0, `node ${id} exits 0 on SIGTERM\n${node.logs()}`);
    });
  }
  // Ready: the backplane is up and the presence store answers.
  for (const node of nodes) {
    await until(`${node.id} ready`, async () => (await fetch(`${node.url}/readyz`)).status === 200, 15000);
  }
  nginx = await nginxInFront(bins.nginx, nodes.map((n) => `127.0.0.1:${n.port}`));
  cleanups.push(async () => {
    const { code, signal } = await nginx.stop();
    assert.ok(code === 0 || signal === 'SIGTERM', `nginx stopped: ${signal ?? code}\n${nginx.logs()}`);
  });
});

// Everything started is stopped, whatever failed; clients first.
const opened = [];
after(async () => {
  closeAll(opened);
  const errors = [];
  for (const cleanup of cleanups.reverse()) {
    try { await cleanup(); } catch (e) { errors.push(e); }
  }
  if (errors.length) throw errors[0];
});

// ----------------------------------------------------------------- clients

/**
 * A Socket.IO client of `kind` connected through nginx, from
 * `localAddress` when given. engine.io-client hands `localAddress` to its
 * WebSocket transport only; its polling requests (xmlhttprequest-ssl) take
 * just an `agent`, so they get an http.Agent bound to the address.
 */
async function connectSio(kind, localAddress) {
  const [version, transport] = kind.split('-');
  const opts = { reconnection: false, forceNew: true };
  if (transport !== 'upgrade') opts.transports = [transport];
  if (localAddress) {
    opts.localAddress = localAddress;
    opts.agent = new Agent({ localAddress });
  }
  const socket = (version === 'v4' ? io4 : io2)(nginx.url + NS, opts);
  opened.push(socket);
  await once(socket, 'connect');
  return socket;
}

/** The seed's authentication, as a tournament 2 assistant; resolves with the ack. */
function auth(socket, sub) {
  return sailsAuth(socket, token('assistant', sub), { tournamentId: 2 });
}

/** A /ws client through nginx that queues its JSON messages (see `queueJson`). */
async function connectWs(sub, localAddress) {
  const ws = queueJson(new WebSocket(`${nginx.wsUrl}?token=${token('assistant', sub)}`, localAddress ? { localAddress } : {}));
  opened.push(ws);
  await once(ws, 'open');
  return ws;
}

/** The one presence row of `sub` (read through either node: PostgreSQL is shared). */
async function presenceOf(sub) {
  const { status, body } = await nodes[0].get(`/api/presence?sub=${encodeURIComponent(sub)}`);
  assert.equal(status, 200, JSON.stringify(body));
  return body.sockets;
}

async function nodeOf(sub) {
  const rows = await presenceOf(sub);
  assert.equal(rows.length, 1, `one presence row for ${sub}: ${JSON.stringify(rows)}`);
  assert.ok(nodes.some((n) => n.id === rows[0].node), `a node of this cluster: ${rows[0].node}`);
  return rows[0].node;
}

const other = (nodeId) => nodes.find((n) => n.id !== nodeId);
const holder = (nodeId) => nodes.find((n) => n.id === nodeId);

/** POST through nginx (the API is behind it too), as the admin. */
async function viaNginx(path, body) {
  const res = await fetch(nginx.url + path, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token('admin', 'interop-admin')}` },
    body: JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() };
}

/** Records every `event` a socket receives. */
function record(socket, event) {
  const got = [];
  socket.on(event, (d) => got.push(d));
  return got;
}

/**
 * Broadcasts `note` with a fresh id to `assistant_2` through `via` (a node,
 * or 'nginx'), then a `fence` through the same way, and waits for the fence
 * on every socket: the room's messages keep their order on every
 * connection, so by then any second copy of the note would have arrived.
 * Asserts each socket got the note exactly once.
 */
async function broadcastOnce(via, sockets, notes) {
  const n = `${RUN}-${Math.random().toString(36).slice(2)}`;
  const post = (body) => (via === 'nginx' ? viaNginx('/api/broadcast', body) : via.post('/api/broadcast', body));
  const fences = sockets.map((s) => new Promise((res, rej) => {
    const t = setTimeout(() => rej(new Error(`no fence after a broadcast through ${via.id ?? via}`)), 5000);
    const on = (d) => { if (d.n === n) { clearTimeout(t); s.off('fence', on); res(); } };
    s.on('fence', on);
  }));
  let res = await post({ rooms: 'assistant_2', event: 'note', data: { n } });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.equal(res.body.cluster, true);
  res = await post({ rooms: 'assistant_2', event: 'fence', data: { n } });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  await Promise.all(fences);
  sockets.forEach((s, i) => {
    const copies = notes[i].filter((d) => d.n === n).length;
    assert.equal(copies, 1, `socket ${i} got the broadcast through ${via.id ?? via} ${copies} times`);
  });
}

// ------------------------------------------------------------------- tests

test('the committed config: sticky upstream, WebSocket headers, read timeout above keepalive_interval', () => {
  const conf = readFileSync(CONF, 'utf8').replace(/#.*$/gm, '');
  assert.match(conf, /upstream\s+pulso\s*\{[^}]*\b(hash\s+\$remote_addr\s+consistent|ip_hash)\s*;/);
  assert.match(conf, /map\s+\$http_upgrade\s+\$connection_upgrade\s*\{/);
  assert.match(conf, /proxy_http_version\s+1\.1\s*;/);
  assert.match(conf, /proxy_set_header\s+Upgrade\s+\$http_upgrade\s*;/);
  assert.match(conf, /proxy_set_header\s+Connection\s+\$connection_upgrade\s*;/);
  assert.match(conf, /proxy_set_header\s+X-Forwarded-For\s+\$proxy_add_x_forwarded_for\s*;/);
  const [, value, unit] = /proxy_read_timeout\s+(\d+)(s|m)?\s*;/.exec(conf) ?? [];
  assert.ok(value, 'proxy_read_timeout is set');
  const seconds = Number(value) * (unit === 'm' ? 60 : 1);
  assert.ok(seconds > 30, `proxy_read_timeout ${seconds}s is above keepalive_interval (30 s)`);
  // docs/cluster.md quotes the file: every line it shows is there, in order.
  const doc = readFileSync(resolve(here, '../../docs/cluster.md'), 'utf8');
  const quoted = /## Behind nginx[\s\S]*?```nginx\n([\s\S]*?)```/.exec(doc);
  assert.ok(quoted, 'docs/cluster.md quotes the config under "Behind nginx"');
  const significant = (text) => text.split('\n').map((l) => l.replace(/#.*$/, '').trim()).filter(Boolean);
  const fileLines = significant(readFileSync(CONF, 'utf8'));
  let at = 0;
  for (const line of significant(quoted[1])) {
    const found = fileLines.indexOf(line, at);
    assert.ok(found >= 0, `docs/cluster.md shows \`${line}\`, which deploy/nginx/pulso.conf lacks (or has earlier)`);
    at = found + 1;
  }
  // The template the test fills in is the file itself.
  const rendered = renderConfig(readFileSync(CONF, 'utf8'), { servers: ['127.0.0.1:1', '127.0.0.1:2'], listen: '127.0.0.1:3', accessLog: '/tmp/x.log' });
  assert.match(rendered, /server 127\.0\.0\.1:1;\n\s*server 127\.0\.0\.1:2;/);
});

for (const kind of KINDS) {
  test(`${kind} through nginx: authenticates, gets broadcasts made on the other node, its own, and through nginx, once each`, async (t) => {
    if (!presentOr(t, missing)) return;
    const sub = `${RUN}-${kind}`;
    const socket = await connectSio(kind);
    const ack = await auth(socket, sub);
    assert.deepEqual(ack, { body: { socketId: socket.id, rooms: ['assistant', 'assistant_2'] }, statusCode: 200 });
    const at = await nodeOf(sub);
    if (kind.endsWith('-upgrade')) {
      await until('upgraded to WebSocket through nginx', () => socket.io.engine.transport.name === 'websocket');
    }
    const notes = [record(socket, 'note')];
    await broadcastOnce(other(at), [socket], notes);
    await broadcastOnce(holder(at), [socket], notes);
    await broadcastOnce('nginx', [socket], notes);
    assert.equal(socket.io.engine.transport.name, kind.endsWith('-polling') ? 'polling' : 'websocket');
    socket.disconnect();
    await until('presence cleared', async () => (await presenceOf(sub)).length === 0);
  });
}

// Which node each loopback source address lands on (filled as clients connect).
const landing = new Map();

test('clients from several source addresses land on both nodes; a broadcast reaches every one once', async (t) => {
  if (!presentOr(t, missing)) return;
  const clients = []; // { socket, sub, kind, address, node }
  // Every kind at least once, and on until both nodes hold a client. With
  // two nodes each address is a coin toss, so 64 cannot all fall on one.
  for (let i = 0; i < 64; i++) {
    const held = new Set(clients.map((c) => c.node));
    if (i >= KINDS.length && held.size === 2) break;
    const kind = KINDS[i % KINDS.length];
    const address = `127.0.0.${i + 2}`;
    const sub = `${RUN}-spread-${i}`;
    const socket = await connectSio(kind, address);
    assert.equal((await auth(socket, sub)).statusCode, 200);
    const node = await nodeOf(sub);
    landing.set(address, node);
    clients.push({ socket, sub, kind, address, node });
  }
  const held = new Set(clients.map((c) => c.node));
  assert.equal(held.size, 2, `clients from ${clients.length} addresses all landed on ${[...held]}`);
  t.diagnostic(`${clients.length} clients: ${clients.map((c) => `${c.address} ${c.kind} → ${c.node.slice(-1)}`).join(', ')}`);

  // Sticky: a second client from an address lands where the first did, for
  // one address per node.
  for (const nodeId of held) {
    const first = clients.find((c) => c.node === nodeId);
    const sub = `${first.sub}-again`;
    const socket = await connectSio('v4-polling', first.address);
    assert.equal((await auth(socket, sub)).statusCode, 200);
    assert.equal(await nodeOf(sub), nodeId, `a second client from ${first.address}`);
    clients.push({ socket, sub, kind: 'v4-polling', address: first.address, node: nodeId });
  }
  for (const c of clients.filter((c) => c.kind.endsWith('-upgrade'))) {
    await until('upgraded to WebSocket through nginx', () => c.socket.io.engine.transport.name === 'websocket');
  }
  const sockets = clients.map((c) => c.socket);
  const notes = sockets.map((s) => record(s, 'note'));
  await broadcastOnce('nginx', sockets, notes);
  await broadcastOnce(nodes[0], sockets, notes);
  await broadcastOnce(nodes[1], sockets, notes);

  for (const c of clients) c.socket.disconnect();
  await until('presence cleared', async () => {
    for (const c of clients) if ((await presenceOf(c.sub)).length) return false;
    return true;
  });
  // nginx saw each client's own address, whatever its transport (a
  // WebSocket is logged when it closes).
  await until('every source address in the access log', () => {
    const log = nginx.accessLog();
    return clients.every((c) => log.includes(`\n${c.address} `));
  });
});

/** A source address that nginx sends to `nodeId`, found by trying new ones. */
async function addressOn(nodeId) {
  for (const [address, node] of landing) if (node === nodeId) return address;
  for (let i = 100; i < 200; i++) {
    const address = `127.0.0.${i}`;
    if (landing.has(address)) continue;
    const sub = `${RUN}-probe-${i}`;
    const socket = await connectSio('v4-websocket', address);
    assert.equal((await auth(socket, sub)).statusCode, 200);
    landing.set(address, await nodeOf(sub));
    socket.disconnect();
    if (landing.get(address) === nodeId) return address;
  }
  throw new Error(`no source address lands on ${nodeId}`);
}

test('/ws through nginx: subscribers on both nodes get a publish made on the other node once', async (t) => {
  if (!presentOr(t, missing)) return;
  const topic = `${RUN}/ws`;
  const clients = [];
  for (const node of nodes) {
    const address = await addressOn(node.id);
    const sub = `${RUN}-ws-${node.id.slice(-1)}`;
    const ws = await connectWs(sub, address);
    ws.sendJson({ type: 'sub', topic, id: 1 });
    const seen = await ws.upTo((m) => m.id === 1);
    assert.deepEqual(seen.at(-1), { type: 'ack', id: 1 });
    const rows = await presenceOf(sub);
    assert.equal(rows.length, 1);
    assert.equal(rows[0].protocol, 'ws');
    assert.equal(rows[0].node, node.id, `${address} lands on ${node.id} for /ws too`);
    clients.push({ ws, node });
  }
  for (const { ws, node } of clients) {
    // Published on the other node; the fence follows on the same node.
    const n = Math.random().toString(36).slice(2);
    const publisher = other(node.id);
    let res = await publisher.post('/api/publish', { topic, payload: { n } });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    res = await publisher.post('/api/publish', { topic, payload: { fence: n } });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    for (const c of clients) {
      const seen = await c.ws.upTo((m) => m.topic === topic && m.payload.fence === n);
      const copies = seen.filter((m) => m.topic === topic && m.payload.n === n);
      assert.equal(copies.length, 1, `a /ws client on ${c.node.id} got a publish of ${publisher.id} ${copies.length} times`);
    }
  }
  for (const { ws } of clients) {
    ws.close();
    await once(ws, 'close');
  }
});

for (const [kind, eio] of [['v4-polling', 4], ['v2-polling', 3]]) {
  test(`${kind}: a polling request of a live session sent to the other node is answered 400 "Session ID unknown"`, async (t) => {
    if (!presentOr(t, missing)) return;
    const sub = `${RUN}-unknown-${kind}`;
    const socket = await connectSio(kind);
    assert.equal((await auth(socket, sub)).statusCode, 200);
    const at = await nodeOf(sub);
    const sid = socket.io.engine.id;
    const unknown = { code: 1, message: 'Session ID unknown' };
    const path = `/socket.io/?EIO=${eio}&transport=polling&sid=${encodeURIComponent(sid)}`;

    // Straight to the other node: neither a GET nor a POST is served.
    const elsewhere = other(at).url + path;
    let res = await fetch(elsewhere);
    assert.equal(res.status, 400);
    assert.deepEqual(await res.json(), unknown);
    res = await fetch(elsewhere, { method: 'POST', headers: { 'content-type': 'text/plain;charset=UTF-8' }, body: eio === 4 ? '2' : '1:2' });
    assert.equal(res.status, 400);
    assert.deepEqual(await res.json(), unknown);

    // Through nginx from an address that its hash sends to the other node:
    // what a client whose address changed mid-session gets.
    const address = await addressOn(other(at).id);
    const agent = new Agent({ localAddress: address });
    res = await new Promise((resolve, reject) => {
      httpGet(nginx.url + path, { agent }, (r) => {
        let body = '';
        r.on('data', (d) => (body += d));
        r.on('end', () => resolve({ status: r.statusCode, body }));
      }).on('error', reject);
    });
    agent.destroy();
    assert.equal(res.status, 400);
    assert.deepEqual(JSON.parse(res.body), unknown);

    // The session itself was not touched: still polling on its node, it
    // gets a broadcast made on the other node, once.
    assert.equal(socket.connected, true);
    assert.equal(await nodeOf(sub), at);
    await broadcastOnce(other(at), [socket], [record(socket, 'note')]);
    socket.disconnect();
    await until('presence cleared', async () => (await presenceOf(sub)).length === 0);
  });
}
