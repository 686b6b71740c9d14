// The client code of the Sails design document (seeds/004), pasted
// unchanged apart from the server's address and the token, against a real
// pulso: it connects to the server's root (`io.connect('https://host/')`)
// and sends its virtual `get /notifications` there (SPEC §4). Run with
// socket.io-client 4.x and 2.x over each transport, and with sails.io.js's
// default root connection (`io.socket.get`).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { io as io4 } from 'socket.io-client';
import io2 from 'sio2';
import sailsIOClient from 'sails.io.js';
import { pulsoForFile, token, once, until, runPage } from './lib/pulso.mjs';
import { sailsAuth } from './lib/clients.mjs';
import { chromiumOr } from './lib/services.mjs';
import { readFileSync } from 'node:fs';

// The document's two snippets, as written there ("Conexión hacia Onsite"
// and "Conexión hacia Tournament Handler").
const ONSITE = `var notifications = io.connect('https://[local].onsite.gamersarena.com.mx/');
notifications.emit('get', {
    url: "/notifications",
    params: {
        "jwt-api-key": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiYWRtaW4iOnRydWV9.TJVA95OrM7E2cBab30RMHrHDcEfxjoYZgeFONFh7HgQ"
    }
}, function(data) {
    // data is server response
});`;

const TOURNAMENT = `var notifications = io.connect('http://tournament.gamersarena.com.mx/');
notifications.emit('get', {
    url: "/notifications",
    params: {
      "jwt-api-key": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiYWRtaW4iOnRydWV9.TJVA95OrM7E2cBab30RMHrHDcEfxjoYZgeFONFh7HgQ",
      "tournamentId": 2  // identificador del torneo para recibir notificaciones
    }
}, function(data) {
    // data is server response
});`;

const DOC_TOKEN = 'eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiYWRtaW4iOnRydWV9.TJVA95OrM7E2cBab30RMHrHDcEfxjoYZgeFONFh7HgQ';

/** The snippet with only the address and the token replaced. */
function adapt(snippet, url, tok) {
  const out = snippet
    .replace(/io\.connect\('[^']*'\)/, `io.connect('${url}/')`)
    .replace(DOC_TOKEN, tok);
  assert.notEqual(out, snippet);
  return out;
}

const { pulso, opened } = pulsoForFile();

/**
 * Runs `snippet` with `io` standing for the client library given `options`
 * (the transports under test; the snippet itself passes none). The socket
 * the snippet made is returned, and the ack its callback received (its
 * callback is wrapped, not edited).
 */
function runSnippet(snippet, lib, options) {
  let socket;
  let ackData;
  const acked = new Promise((resolve) => {
    const io = {
      connect(url) {
        socket = lib(url, { ...options, reconnection: false, forceNew: true });
        opened.push(socket);
        const emit = socket.emit.bind(socket);
        socket.emit = (event, payload, cb) =>
          emit(event, payload, (data) => {
            ackData = data;
            resolve(data);
            cb(data);
          });
        return socket;
      },
    };
    new Function('io', snippet)(io);
  });
  const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error('no ack for the snippet')), 10000));
  return Promise.race([acked, timeout]).then(() => ({ socket, ack: ackData }));
}

async function presenceOf(sub) {
  const { status, body } = await pulso.get(`/api/presence?sub=${encodeURIComponent(sub)}`);
  assert.equal(status, 200, JSON.stringify(body));
  return body.sockets;
}

const libs = [
  ['socket.io-client 4.x', io4, 'v4'],
  ['socket.io-client 2.x', io2, 'v2'],
];
const transports = [
  ['websocket', { transports: ['websocket'] }],
  ['polling', { transports: ['polling'] }],
  ['polling then upgrade', {}],
];

for (const [libName, lib, tag] of libs) {
  for (const [transport, options] of transports) {
    test(`the seed's snippets with ${libName} over ${transport}`, async () => {
      // Onsite: an assistant joins `assistant`.
      const onsiteSub = `seed-${tag}-${transport}-onsite`;
      const onsite = await runSnippet(adapt(ONSITE, pulso.url, token('assistant', onsiteSub)), lib, options);
      assert.deepEqual(onsite.ack, { body: { socketId: onsite.socket.id, rooms: ['assistant'] }, statusCode: 200 });
      // On the root, socket.id is the engine id for 2.x clients too.
      assert.doesNotMatch(onsite.socket.id, /#/);
      // The row is there when the ack is.
      const rows = await presenceOf(onsiteSub);
      assert.equal(rows.length, 1);
      assert.equal(rows[0].socket_id, onsite.socket.id);

      // Tournament Handler: `assistant` and `assistant_2`.
      const thSub = `seed-${tag}-${transport}-th`;
      const th = await runSnippet(adapt(TOURNAMENT, pulso.url, token('assistant', thSub)), lib, options);
      assert.deepEqual(th.ack, { body: { socketId: th.socket.id, rooms: ['assistant', 'assistant_2'] }, statusCode: 200 });

      if (transport === 'polling then upgrade') {
        await until('upgraded', () => th.socket.io.engine.transport.name === 'websocket');
      }

      // The document's broadcast: `check_in` to `assistant_2` reaches the
      // tournament socket only; to `assistant`, both.
      const got = once(th.socket, 'check_in');
      let res = await pulso.post('/api/broadcast', { rooms: 'assistant_2', event: 'check_in', data: { check_in_id: { id: 4, nick: 'aguila_calva' } } });
      assert.equal(res.status, 200);
      assert.deepEqual(await got, { check_in_id: { id: 4, nick: 'aguila_calva' } });
      const both = [once(onsite.socket, 'all'), once(th.socket, 'all')];
      res = await pulso.post('/api/broadcast', { rooms: 'assistant', event: 'all', data: { n: 1 } });
      assert.equal(res.status, 200);
      assert.deepEqual(await Promise.all(both), [{ n: 1 }, { n: 1 }]);

      onsite.socket.close();
      th.socket.close();
      await until('presence cleared', async () =>
        (await presenceOf(onsiteSub)).length === 0 && (await presenceOf(thSub)).length === 0);
    });
  }
}

test('a failed authentication on the root is answered, then the socket is disconnected', async () => {
  for (const lib of [io4, io2]) {
    const { socket, ack } = await runSnippet(adapt(ONSITE, pulso.url, 'not-a-jwt'), lib, { transports: ['websocket'] });
    assert.equal(ack.statusCode, 401);
    assert.equal(ack.body.error.code, '401-2');
    if (socket.connected) {
      const r = await once(socket, 'disconnect');
      assert.equal(Array.isArray(r) ? r[0] : r, 'io server disconnect');
    }
  }
});

test('a root socket and a namespace socket in one room both get a broadcast', async () => {
  const root = await runSnippet(adapt(ONSITE, pulso.url, token('timer', 'seed-mixed-root')), io4, {});
  const ns = io4(`${pulso.url}/notifications`, { reconnection: false, forceNew: true });
  opened.push(ns);
  const ack = await sailsAuth(ns, token('timer', 'seed-mixed-ns'));
  assert.equal(ack.statusCode, 200);
  const got = [once(root.socket, 'ring'), once(ns, 'ring')];
  const res = await pulso.post('/api/broadcast', { rooms: 'timer', event: 'ring', data: 'x' });
  assert.deepEqual(res.body, { recipients: 2 });
  assert.deepEqual(await Promise.all(got), ['x', 'x']);
  root.socket.close();
  ns.close();
});

test("sails.io.js: io.socket.get('/notifications') on its default root connection", async () => {
  const io = sailsIOClient(io2);
  io.sails.url = pulso.url;
  io.sails.environment = 'production'; // no console banners
  io.sails.reconnection = false;
  opened.push({ close: () => io.socket.isConnected() && io.socket.disconnect() });
  const sub = 'seed-sails-root';
  const [body, jwr] = await new Promise((resolve) =>
    io.socket.get('/notifications', { 'jwt-api-key': token('assistant', sub), tournamentId: 2 }, (b, j) => resolve([b, j])),
  );
  assert.equal(jwr.statusCode, 200, JSON.stringify(body));
  assert.deepEqual(body.rooms, ['assistant', 'assistant_2']);
  // The root socket's id is the engine id.
  assert.equal(body.socketId, io.socket._raw.id);
  assert.doesNotMatch(body.socketId, /#/);
  const rows = await presenceOf(sub);
  assert.equal(rows.length, 1);
  assert.equal(rows[0].socket_id, body.socketId);

  const got = new Promise((resolve) => io.socket.on('check_in', resolve));
  const res = await pulso.post('/api/broadcast', { rooms: 'assistant_2', event: 'check_in', data: { id: 4 } });
  assert.equal(res.status, 200);
  assert.deepEqual(await got, { id: 4 });
  io.socket.disconnect();
  await until('presence cleared', async () => (await presenceOf(sub)).length === 0);
});

// The snippet in a real page, as the document's front end runs it: the
// browser's default transport (polling, then the upgrade), cross-origin.
test("the seed's snippet in headless Chromium", async (t) => {
  const chromium = chromiumOr(t);
  if (!chromium) return;
  const bundle = readFileSync(new URL('./node_modules/socket.io-client/dist/socket.io.min.js', import.meta.url));
  const snippet = adapt(TOURNAMENT, pulso.url, token('assistant', 'seed-browser'));
  // As in Node: the page's `io` is wrapped to see the ack, the snippet is not edited.
  const page = `<html><body><pre id="out">pending</pre><img src="/slow">
<script src="/io.js"></script>
<script>
(function (io) {
${snippet}
})({
  connect(url) {
    const socket = window.io.connect(url, { reconnection: false });
    const emit = socket.emit.bind(socket);
    socket.emit = (event, payload, cb) => emit(event, payload, (data) => {
      document.getElementById('out').textContent = 'ACK ' + JSON.stringify({ data, id: socket.id });
      cb(data);
    });
    return socket;
  },
});
</script></body></html>`;
  const { data, id } = await runPage(chromium, page, 'ACK', { '/io.js': ['text/javascript', bundle] });
  assert.deepEqual(data, { body: { socketId: id, rooms: ['assistant', 'assistant_2'] }, statusCode: 200 });
});
