'use strict';
// The Node baseline: what pulso replaces, written the way a competent Node
// developer would, following the original designs:
//   - npm `ws` on /ws with pulso's JSON protocol subset (sub/unsub/ping;
//     published messages are {topic, ts, payload}), JWT (HS256) in ?token=
//     or Authorization, ping/pong heartbeat;
//   - socket.io 4 with allowEIO3 on /notifications, the `get`/`post` virtual
//     request authentication and rooms `{role}` and `{role}_{tournamentId}`;
//   - POST /api/publish and /api/broadcast (Bearer JWT with role admin or
//     service), each message serialized once for all /ws recipients;
//   - GET /metrics with the gauges the churn scenario reads;
//   - with REDIS_URL set, several such nodes act as one socket.io server
//     through `@socket.io/redis-adapter` (the usual way to scale socket.io
//     out): a broadcast made on any node reaches the rooms' sockets on every
//     node. Only socket.io is shared this way; /ws topics stay per node.
// Usage: PORT=8081 JWT_SECRET=bench-secret node server.js
//        REDIS_URL=redis://127.0.0.1:6379 REDIS_PREFIX=socket.io PORT=… node server.js

const http = require('http');
const { WebSocketServer } = require('ws');
const { Server } = require('socket.io');
const jwt = require('jsonwebtoken');

const PORT = Number(process.env.PORT || 8081);
const HOST = process.env.HOST || '127.0.0.1';
const SECRET = process.env.JWT_SECRET || 'bench-secret';
const PUBLISHER_ROLES = new Set(['admin', 'service']);
const MAX_BODY = 1024 * 1024;
const HEARTBEAT_MS = 30000;
const AUTH_TIMEOUT_MS = 10000;
const REDIS_URL = process.env.REDIS_URL || '';
// The adapter's channel prefix (`key`): one per cluster sharing a Redis.
const REDIS_PREFIX = process.env.REDIS_PREFIX || 'socket.io';

function verify(token) {
  return jwt.verify(token, SECRET, { algorithms: ['HS256'] });
}

function validTopic(t) {
  return typeof t === 'string' && t.length > 0 && Buffer.byteLength(t) <= 256 && !/[\u0000-\u001f\u007f]/.test(t);
}

// ---------------------------------------------------------------- /ws

const topics = new Map(); // topic -> Set<WebSocket>
let subscriptions = 0;

function subscribe(ws, topic) {
  if (ws.topics.has(topic)) return;
  ws.topics.add(topic);
  let set = topics.get(topic);
  if (!set) topics.set(topic, (set = new Set()));
  set.add(ws);
  subscriptions++;
}

function unsubscribe(ws, topic) {
  if (!ws.topics.delete(topic)) return;
  const set = topics.get(topic);
  if (set) {
    set.delete(ws);
    if (set.size === 0) topics.delete(topic);
  }
  subscriptions--;
}

const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024 });

function reply(ws, obj) {
  ws.send(JSON.stringify(obj));
}

function error(ws, id, code, message) {
  const e = { type: 'error', code, message };
  if (id !== undefined) e.id = id;
  reply(ws, e);
}

wss.on('connection', (ws) => {
  ws.isAlive = true;
  ws.topics = new Set();
  ws.on('pong', () => { ws.isAlive = true; });
  ws.on('message', (data, isBinary) => {
    if (isBinary) return error(ws, undefined, 'unsupported_binary', 'binary frames are not supported');
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (e) {
      return error(ws, undefined, 'bad_request', 'message is not valid JSON');
    }
    if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
      return error(ws, undefined, 'bad_request', 'message must be a JSON object');
    }
    const id = msg.id;
    switch (msg.type) {
      case 'sub':
      case 'unsub':
        if (!validTopic(msg.topic)) return error(ws, id, 'invalid_topic', 'invalid topic');
        if (msg.type === 'sub') subscribe(ws, msg.topic); else unsubscribe(ws, msg.topic);
        if (id !== undefined) reply(ws, { type: 'ack', id });
        return;
      case 'ping': {
        const p = { type: 'pong', ts: Date.now() };
        if (id !== undefined) p.id = id;
        return reply(ws, p);
      }
      default:
        return error(ws, id, 'unknown_type', 'unknown message type');
    }
  });
  ws.on('close', () => {
    for (const t of [...ws.topics]) unsubscribe(ws, t);
  });
});

const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.isAlive) { ws.terminate(); continue; }
    ws.isAlive = false;
    ws.ping();
  }
}, HEARTBEAT_MS);
heartbeat.unref();

function tokenOf(req) {
  const auth = req.headers.authorization || '';
  if (auth.startsWith('Bearer ') || auth.startsWith('bearer ')) return auth.slice(7).trim();
  const url = new URL(req.url, 'http://x');
  return url.searchParams.get('token');
}

// ---------------------------------------------------------- HTTP API

function send(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

function readJson(req, res, then) {
  const chunks = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size > MAX_BODY) {
      send(res, 413, { error: { code: 'payload_too_large', message: 'body too large' } });
      req.destroy();
      return;
    }
    chunks.push(c);
  });
  req.on('end', () => {
    if (size > MAX_BODY) return;
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks));
    } catch (e) {
      return send(res, 400, { error: { code: 'bad_request', message: 'body is not valid JSON' } });
    }
    then(body);
  });
}

function publisher(req, res) {
  const auth = req.headers.authorization || '';
  const token = auth.startsWith('Bearer ') ? auth.slice(7).trim() : '';
  if (!token) {
    send(res, 401, { error: { code: 'unauthorized', message: 'no credentials' } });
    return false;
  }
  let claims;
  try {
    claims = verify(token);
  } catch (e) {
    send(res, 401, { error: { code: 'invalid_token', message: e.message } });
    return false;
  }
  if (!PUBLISHER_ROLES.has(claims.role)) {
    send(res, 403, { error: { code: 'forbidden', message: 'role may not publish' } });
    return false;
  }
  return true;
}

// Delivers to /ws subscribers of each room (once per socket, topic = first
// room it matches) and to socket.io sockets in the rooms.
function deliver(rooms, event, payload) {
  const ts = Date.now();
  const seen = new Set();
  for (const room of rooms) {
    const set = topics.get(room);
    if (!set) continue;
    const frame = JSON.stringify(event ? { topic: room, ts, event, payload } : { topic: room, ts, payload });
    for (const ws of set) {
      if (seen.has(ws)) continue;
      seen.add(ws);
      if (ws.readyState === 1) ws.send(frame);
    }
  }
  let sio = 0;
  const adapterRooms = notifications.adapter.rooms;
  if (rooms.length === 1) {
    sio = adapterRooms.get(rooms[0])?.size || 0;
  } else {
    const ids = new Set();
    for (const r of rooms) for (const id of adapterRooms.get(r) || []) ids.add(id);
    sio = ids.size;
  }
  // With the Redis adapter the broadcast goes to the other nodes as well,
  // whether or not this node holds a socket of the rooms.
  if (sio > 0 || REDIS_URL) notifications.to(rooms).emit(event || 'message', payload);
  return seen.size + sio;
}

const server = http.createServer((req, res) => {
  const path = req.url.split('?')[0];
  if (req.method === 'POST' && (path === '/api/publish' || path === '/api/broadcast')) {
    if (!publisher(req, res)) return req.resume();
    return readJson(req, res, (body) => {
      if (body === null || typeof body !== 'object') {
        return send(res, 400, { error: { code: 'bad_request', message: 'body must be an object' } });
      }
      let rooms, payload;
      if (path === '/api/publish') {
        if (!validTopic(body.topic)) return send(res, 400, { error: { code: 'invalid_topic', message: 'invalid topic' } });
        if (body.payload === undefined) return send(res, 400, { error: { code: 'bad_request', message: 'missing field `payload`' } });
        rooms = [body.topic];
        payload = body.payload;
      } else {
        rooms = Array.isArray(body.rooms) ? body.rooms : [body.rooms];
        if (rooms.length === 0 || !rooms.every(validTopic)) {
          return send(res, 400, { error: { code: 'invalid_topic', message: 'invalid rooms' } });
        }
        if (body.data === undefined) return send(res, 400, { error: { code: 'bad_request', message: 'missing field `data`' } });
        payload = body.data;
      }
      const event = typeof body.event === 'string' ? body.event : undefined;
      send(res, 200, { recipients: deliver(rooms, event, payload) });
    });
  }
  if (req.method === 'GET' && path === '/metrics') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    return res.end(
      `pulso_connections{protocol="ws"} ${wss.clients.size}\n` +
      `pulso_connections{protocol="socketio"} ${notifications.sockets.size}\n` +
      `pulso_subscriptions ${subscriptions}\n` +
      `pulso_topics ${topics.size}\n`,
    );
  }
  if (req.method === 'GET' && path === '/healthz') return send(res, 200, { status: 'ok' });
  send(res, 404, { error: { code: 'not_found', message: 'not found' } });
});

server.on('upgrade', (req, socket, head) => {
  const path = req.url.split('?')[0];
  if (path !== '/ws') return; // socket.io handles /socket.io/
  let claims;
  try {
    claims = verify(tokenOf(req) || '');
  } catch (e) {
    const body = JSON.stringify({ error: { code: 'invalid_token', message: e.message } });
    socket.end(`HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`);
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    ws.claims = claims;
    wss.emit('connection', ws, req);
  });
});

// ----------------------------------------------------------- socket.io

const io = new Server(server, { allowEIO3: true, destroyUpgrade: false, cors: { origin: true, credentials: true } });
const notifications = io.of('/notifications');

function virtualRequest(socket, req, ack) {
  const respond = typeof ack === 'function' ? ack : () => {};
  const fail = (status, code, message) => {
    respond({ body: { error: { code, message } }, statusCode: status });
    if (!socket.data.authenticated) socket.disconnect(true);
  };
  if (!req || typeof req !== 'object') return fail(400, '400-1', 'malformed request');
  const url = req.url || (req.header && req.header.url);
  if (!url) return fail(400, '400-1', 'request without url');
  if (url.split('?')[0] !== '/notifications') return fail(404, '404-1', 'unknown url');
  const params = Object.assign({}, req.headers, req.header, req.body, req.data, req.params);
  const token = params['jwt-api-key'];
  if (!token) return fail(401, '401-1', 'missing token');
  let claims;
  try {
    claims = verify(token);
  } catch (e) {
    return fail(401, e.name === 'TokenExpiredError' ? '401-3' : '401-2', e.message);
  }
  const role = claims.role;
  const rooms = [];
  const ok = (v) => (typeof v === 'string' || Number.isInteger(v)) && /^[A-Za-z0-9_.:-]+$/.test(String(v));
  if (ok(role)) rooms.push(String(role));
  const tid = claims.tournamentId !== undefined ? claims.tournamentId : params.tournamentId;
  if (ok(role) && ok(tid)) rooms.push(`${role}_${tid}`);
  socket.data.authenticated = true;
  socket.join(rooms);
  respond({ body: { socketId: socket.id, rooms }, statusCode: 200 });
}

notifications.on('connection', (socket) => {
  const timer = setTimeout(() => {
    if (!socket.data.authenticated) socket.disconnect(true);
  }, AUTH_TIMEOUT_MS);
  socket.on('disconnect', () => clearTimeout(timer));
  socket.on('get', (req, ack) => virtualRequest(socket, req, ack));
  socket.on('post', (req, ack) => virtualRequest(socket, req, ack));
});

// With REDIS_URL: the adapter on both namespaces, and its subscriptions
// active, before the port opens (a subscription made afterwards on the same
// connection is answered after the adapter's own).
async function useRedis() {
  const { createClient } = require('redis');
  const { createAdapter } = require('@socket.io/redis-adapter');
  const pub = createClient({ url: REDIS_URL });
  const sub = pub.duplicate();
  for (const c of [pub, sub]) c.on('error', (e) => console.error(`redis: ${e.message}`));
  await Promise.all([pub.connect(), sub.connect()]);
  io.adapter(createAdapter(pub, sub, { key: REDIS_PREFIX }));
  await sub.subscribe(`${REDIS_PREFIX}-ready#${process.pid}`, () => {});
}

(REDIS_URL ? useRedis() : Promise.resolve()).then(
  () => server.listen(PORT, HOST, () => {
    const cluster = REDIS_URL ? `, redis adapter on ${REDIS_URL} key ${REDIS_PREFIX}` : '';
    console.error(`node baseline listening on ${HOST}:${PORT} (pid ${process.pid}${cluster})`);
  }),
  (e) => {
    console.error(`cannot start: ${e.message}`);
    process.exit(1);
  },
);

process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
