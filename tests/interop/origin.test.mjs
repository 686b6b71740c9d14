// `allowed_origins` in a real browser: headless Chromium loads a page from
// an origin in the list and one from a foreign origin (each its own small
// HTTP server on another port), and each page opens `/ws` and socket.io
// (long-polling, as socket.io-client starts, and a direct WebSocket). The
// allowed page gets through on all three; the foreign one on none, and the
// server counts the refusals.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { startPulso, freePort, token, runPage } from './lib/pulso.mjs';
import { chromiumOr } from './lib/services.mjs';

let pulso;
let allowedPort;
before(async () => {
  allowedPort = await freePort();
  pulso = await startPulso({ PULSO_ALLOWED_ORIGINS: `http://127.0.0.1:${allowedPort}` });
});
after(async () => {
  assert.equal(await pulso.stop(), 0, 'pulso exits 0 on SIGTERM');
});

const bundle = readFileSync(new URL('./node_modules/socket.io-client/dist/socket.io.min.js', import.meta.url));

/** A page that tries /ws and socket.io over both transports, and writes what happened. */
function page() {
  const wsUrl = `${pulso.wsUrl}?token=${token('assistant', 'origin-page')}`;
  return `<html><body><pre id="out">pending</pre><img src="/slow">
<script src="/io.js"></script>
<script>
const result = {};
const settle = (name, value) => {
  if (name in result) return;
  result[name] = value;
  if (Object.keys(result).length === 3) {
    document.getElementById('out').textContent = 'RESULT ' + JSON.stringify(result);
  }
};
const ws = new WebSocket(${JSON.stringify(wsUrl)});
ws.onopen = () => { settle('ws', 'open'); ws.close(); };
ws.onerror = () => settle('ws', 'error');
for (const transport of ['polling', 'websocket']) {
  const socket = io(${JSON.stringify(pulso.url)}, { transports: [transport], reconnection: false, forceNew: true, timeout: 2500 });
  socket.on('connect', () => { settle(transport, 'connected'); socket.close(); });
  socket.on('connect_error', () => settle(transport, 'error'));
}
</script></body></html>`;
}

async function refusals() {
  const { body } = await pulso.get('/metrics');
  const count = (endpoint) => {
    const m = new RegExp(`^pulso_origin_refused_total\\{endpoint="${endpoint}"\\} (\\d+)`, 'm').exec(body);
    return m ? Number(m[1]) : 0;
  };
  return { ws: count('ws'), socketio: count('socketio') };
}

test('a page from an allowed origin connects; a foreign page is refused on /ws and socket.io', async (t) => {
  const chromium = chromiumOr(t);
  if (!chromium) return;
  const extra = { '/io.js': ['text/javascript', bundle] };
  const allowed = await runPage(chromium, page(), 'RESULT', extra, allowedPort);
  assert.deepEqual(allowed, { ws: 'open', polling: 'connected', websocket: 'connected' });
  assert.deepEqual(await refusals(), { ws: 0, socketio: 0 });

  const foreign = await runPage(chromium, page(), 'RESULT', extra);
  assert.deepEqual(foreign, { ws: 'error', polling: 'error', websocket: 'error' });
  const counted = await refusals();
  assert.equal(counted.ws, 1, JSON.stringify(counted));
  assert.ok(counted.socketio >= 2, JSON.stringify(counted));
});
