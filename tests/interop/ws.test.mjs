// The npm `ws` client (the library the original design used) against /ws.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { pulsoForFile, token, once, runPage } from './lib/pulso.mjs';
import { queueJson } from './lib/clients.mjs';
import { chromiumOr } from './lib/services.mjs';

const { pulso } = pulsoForFile({ PULSO_DEMO_ENABLED: 'true', PULSO_DEMO_INTERVAL: '100ms' });

/** Opens a client that queues every JSON message (see `queueJson`). */
async function connect(tok) {
  const ws = queueJson(new WebSocket(`${pulso.wsUrl}?token=${tok}`));
  await once(ws, 'open');
  return ws;
}

test('receives a message published over HTTP', async () => {
  const ws = await connect(token('assistant', 'node-1'));
  ws.sendJson({ type: 'sub', topic: 'checkins', id: 1 });
  assert.deepEqual(await ws.until((m) => m.id === 1), { type: 'ack', id: 1 });
  const res = await pulso.post('/api/publish', { topic: 'checkins', payload: { check_in_id: { id: 4, nick: 'aguila_calva' } } });
  assert.equal(res.status, 200);
  assert.equal(res.body.recipients, 1);
  const msg = await ws.until((m) => m.topic === 'checkins');
  assert.deepEqual(msg.payload, { check_in_id: { id: 4, nick: 'aguila_calva' } });
  assert.equal(typeof msg.ts, 'number');
  ws.close();
});

test('receives the demo feed', async () => {
  const ws = await connect(token('assistant', 'node-2'));
  ws.sendJson({ type: 'sub', topic: 'metricas/demo' });
  const msg = await ws.until((m) => m.topic === 'metricas/demo');
  assert.equal(typeof msg.payload.value, 'number');
  ws.close();
});

test('ping gets pong, errors keep the connection', async () => {
  const ws = await connect(token('timer', 'node-3'));
  ws.sendJson({ type: 'ping', id: 'p' });
  const pong = await ws.until((m) => m.id === 'p');
  assert.equal(pong.type, 'pong');
  ws.send('not json');
  assert.equal((await ws.until((m) => m.type === 'error')).code, 'bad_request');
  ws.sendJson({ type: 'ping', id: 2 });
  assert.equal((await ws.until((m) => m.id === 2)).type, 'pong');
  ws.close();
});

test('a bad token is rejected with 401 before the upgrade', async () => {
  for (const [tok, code] of [['garbage', 'invalid_token'], [null, 'unauthorized']]) {
    const ws = new WebSocket(tok ? `${pulso.wsUrl}?token=${tok}` : pulso.wsUrl);
    ws.on('error', () => {}); // the refused upgrade also surfaces as an error
    const res = await once(ws, 'unexpected-response');
    const [, response] = res;
    assert.equal(response.statusCode, 401);
    let body = '';
    for await (const chunk of response) body += chunk;
    assert.equal(JSON.parse(body).error.code, code);
  }
});

// A real browser's WebSocket against pulso's hand-written framing: masked
// frames, a 40 KB message, the close handshake. Uses the machine's Chromium.
test('headless Chromium: ping, a 40 KB message, the demo feed, a clean close', async (t) => {
  const chromium = chromiumOr(t);
  if (!chromium) return;
  const tok = token('assistant', 'browser-ws');
  const page = `<html><body><pre id="out">pending</pre><img src="/slow">
<script>
const out = document.getElementById('out');
const got = {};
const ws = new WebSocket('${pulso.wsUrl}?token=${tok}');
ws.onerror = () => { out.textContent = 'error'; };
ws.onopen = () => {
  ws.send(JSON.stringify({ type: 'ping', id: 1 }));
  ws.send(JSON.stringify({ type: 'unknown', id: 2, pad: 'x'.repeat(40000) }));
  ws.send(JSON.stringify({ type: 'sub', topic: 'metricas/demo', id: 3 }));
};
ws.onmessage = (e) => {
  const m = JSON.parse(e.data);
  if (m.id === 1) got.pong = m.type;
  if (m.id === 2) got.big = m.code;
  if (m.id === 3) got.sub = m.type;
  if (m.topic === 'metricas/demo' && !got.demo) {
    got.demo = typeof m.payload.value;
    ws.close(4000, 'done');
  }
};
ws.onclose = (e) => { out.textContent = 'DONE ' + JSON.stringify({ ...got, code: e.code, clean: e.wasClean }); };
</script></body></html>`;
  assert.deepEqual(await runPage(chromium, page, 'DONE'), {
    pong: 'pong', big: 'unknown_type', sub: 'ack', demo: 'number', code: 4000, clean: true,
  });
});
