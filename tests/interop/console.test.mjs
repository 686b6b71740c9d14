// The console (`GET /`) in headless Chromium, driven with playwright-core
// against the real binary: it connects with a pasted token, charts what is
// published (read back through the page's `window.__console` hook and off
// the canvas pixels), shows the connection and subscriber counts the
// server really has, filters its live tail, and publishes through its
// form. With PULSO_SCREENSHOTS=1 it also saves docs/console/*.png.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';
import { io } from 'socket.io-client';
import { chromium as playwright } from 'playwright-core';
import { startPulso, token, until, once } from './lib/pulso.mjs';
import { sailsAuth } from './lib/clients.mjs';
import { chromiumOr, findChromium } from './lib/services.mjs';

const SCREENSHOTS = process.env.PULSO_SCREENSHOTS === '1';
const ADMIN = token('admin', 'console-operator');

let pulso;
let browser;
let page;
/** Errors the page logged (a CSP refusal, an exception): none expected. */
const pageErrors = [];
const clients = [];

before(async () => {
  pulso = await startPulso({ PULSO_DEMO_ENABLED: 'true', PULSO_DEMO_INTERVAL: '200ms' });
  const executablePath = findChromium();
  if (!executablePath) return; // each test skips, or fails under .ci/run
  browser = await playwright.launch({ executablePath, args: ['--no-sandbox', '--disable-gpu'] });
  page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(m.text()); });
  page.on('pageerror', (e) => pageErrors.push(e.message));
});

after(async () => {
  for (const c of clients) c.close();
  if (browser) await browser.close();
  assert.equal(await pulso.stop(), 0, 'pulso exits 0 on SIGTERM');
});

/** True when the browser runs; else the test is skipped, or fails under PULSO_REQUIRE_SERVICES=1. */
function needBrowser(t) {
  return Boolean(chromiumOr(t)) && Boolean(browser);
}

/** A `/ws` client subscribed to `topics`, once every sub is acknowledged. */
async function wsClient(sub, topics) {
  const ws = new WebSocket(`${pulso.wsUrl}?token=${token('assistant', sub)}`);
  clients.push(ws);
  const inbox = [];
  const waiters = [];
  ws.on('message', (data) => {
    const m = JSON.parse(data);
    inbox.push(m);
    for (const w of waiters.splice(0)) w();
  });
  await once(ws, 'open');
  for (const [i, topic] of topics.entries()) ws.send(JSON.stringify({ type: 'sub', topic, id: i + 1 }));
  const next = (pred) => until('a /ws message', () => {
    const i = inbox.findIndex(pred);
    return i >= 0 ? inbox.splice(i, 1)[0] : null;
  });
  for (let i = 1; i <= topics.length; i++) {
    const ack = await next((m) => m.id === i);
    assert.equal(ack.type, 'ack', JSON.stringify(ack));
  }
  return { ws, next, close: () => ws.close() };
}

/** A Socket.IO client on the namespace, authenticated as the seed's pages
 *  do (a virtual `get /notifications`); resolves with it and its rooms. */
async function sioClient(sub) {
  const s = io(`${pulso.url}/notifications`, { transports: ['websocket'], reconnection: false, forceNew: true });
  clients.push(s);
  await once(s, 'connect');
  const ack = await sailsAuth(s, token('assistant', sub));
  assert.equal(ack.statusCode, 200, JSON.stringify(ack));
  return { socket: s, rooms: ack.body.rooms };
}

/** What the page shows in element `selector` (trimmed text), or null. */
function shown(selector) {
  return page.evaluate((s) => document.querySelector(s)?.textContent.trim() ?? null, selector);
}

/** The subscriber count the page shows for `name` in its busiest list. */
function shownSubscribers(name) {
  return page.evaluate((n) => {
    const row = [...document.querySelectorAll('#top tbody tr')].find((tr) => tr.dataset.topic === n);
    return row ? row.querySelector('td.num').textContent : null;
  }, name);
}

/** Pixels of the chart's canvas close to `rgb`: in its plot area, or in
 *  the band `below` or `left` of it (where the axes are drawn). */
function pixelsOf(chart, [r, g, b], where = 'plot') {
  return page.evaluate(({ chart, r, g, b, where }) => {
    const u = window.__console.plots[chart];
    const { left, top, width, height } = u.bbox;
    const area = {
      plot: [left, top, width, height],
      below: [left, top + height, width, u.ctx.canvas.height - top - height],
      left: [0, top, left, height],
    }[where];
    const { data } = u.ctx.getImageData(...area);
    let n = 0;
    for (let i = 0; i < data.length; i += 4) {
      if (Math.abs(data[i] - r) < 24 && Math.abs(data[i + 1] - g) < 24 && Math.abs(data[i + 2] - b) < 24 && data[i + 3] > 200) n++;
    }
    return n;
  }, { chart, r, g, b, where });
}

test('a wrong token is refused and said so', async (t) => {
  if (!needBrowser(t)) return;
  await page.goto(`${pulso.url}/`);
  await page.fill('#token', 'not-a-token');
  await page.click('#connect');
  await until('the refusal on the page', async () => (await shown('#ready')) === 'token refused');
  assert.match(await shown('#state'), /invalid_token/);
  assert.equal(await page.evaluate(() => window.__console.live()), false);
});

test('it connects with a pasted token and charts live values on scrolling time axes', async (t) => {
  if (!needBrowser(t)) return;
  await page.goto(`${pulso.url}/`);
  // The refused token was not kept; what the browser logged about its
  // 401 is not an error of the page.
  assert.equal(await page.inputValue('#token'), '');
  pageErrors.length = 0;
  await page.fill('#token', ADMIN);
  await page.click('#connect');
  await until('the live feed', () => page.evaluate(() => window.__console.live()));
  await until('the first /api/console answer', () => page.evaluate(() => window.__console.state() !== null));
  assert.equal(await page.evaluate(() => sessionStorage.getItem('pulso.console.token')), ADMIN);
  assert.equal(await shown('#ready'), 'ready');
  assert.equal(await shown('#node'), `interop-${pulso.port}`);

  // The demo feed, every 200 ms.
  const demo = await until('three demo points', async () => {
    const s = await page.evaluate(() => window.__console.series().demo);
    return s.length >= 3 ? s : null;
  });
  for (const [x, y] of demo) {
    assert.ok(Math.abs(x * 1000 - Date.now()) < 60000, `x is a time in seconds: ${x}`);
    assert.ok(y >= -1.2 && y <= 1.2, `a sine value: ${y}`);
  }

  // One series per topic under temperature/#, with the published values.
  const sent = { 'temperature/room-a': [20.5, 21.25], 'temperature/room-b': [18.75] };
  for (const [topic, values] of Object.entries(sent)) {
    for (const celsius of values) {
      assert.equal((await pulso.post('/api/publish', { topic, payload: { celsius } })).status, 200);
    }
  }
  await pulso.post('/api/publish', { topic: 'temperature/room-b', payload: 'not a number' });
  const temperature = await until('the temperature series', async () => {
    const s = await page.evaluate(() => window.__console.series().temperature);
    const a = s['temperature/room-a'] ?? [];
    const b = s['temperature/room-b'] ?? [];
    return a.length === 2 && b.length === 1 ? s : null;
  });
  assert.deepEqual(Object.keys(temperature).sort(), ['temperature/room-a', 'temperature/room-b']);
  assert.deepEqual(temperature['temperature/room-a'].map(([, y]) => y), [20.5, 21.25]);
  assert.deepEqual(temperature['temperature/room-b'].map(([, y]) => y), [18.75]);

  // Drawn: the demo line (#1769aa) and room-a's (#e4572e) are on their
  // canvases, with labelled axes.
  await until('the demo line on its canvas', async () => (await pixelsOf('demo', [0x17, 0x69, 0xaa])) > 30);
  await until("room-a's line on its canvas", async () => (await pixelsOf('temperature', [0xe4, 0x57, 0x2e])) > 10);
  // Time and value axes: their labels, and their text drawn under and
  // left of the plot area (uPlot draws axes on the canvas).
  const axes = await page.evaluate(() => {
    const u = window.__console.plots.demo;
    return { x: u.axes[0]._values, y: u.axes[1]._values };
  });
  assert.ok(axes.x.length >= 2 && axes.x.every((v) => /^\d{2}:\d{2}:\d{2}$/.test(v)), `x labels are times: ${axes.x}`);
  assert.ok(axes.y.length >= 2 && axes.y.every((v) => Number.isFinite(Number(v))), `y labels are values: ${axes.y}`);
  assert.ok((await pixelsOf('demo', [0x6b, 0x74, 0x82], 'below')) > 20, 'x axis labels drawn');
  assert.ok((await pixelsOf('demo', [0x6b, 0x74, 0x82], 'left')) > 20, 'y axis labels drawn');
  const legend = await page.evaluate(() =>
    [...document.querySelectorAll('#chart-temperature .u-legend .u-label')].map((l) => l.textContent));
  assert.deepEqual(legend.filter((l) => l.startsWith('temperature/')), ['temperature/room-a', 'temperature/room-b']);

  // The x axis scrolls with time: its end moves forward.
  const end = await page.evaluate(() => window.__console.plots.demo.scales.x.max);
  await until('the x axis to move', async () =>
    (await page.evaluate(() => window.__console.plots.demo.scales.x.max)) > end + 1.5, 6000);
});

test('the counts it shows are the server\'s: connections by protocol and subscribers per topic', async (t) => {
  if (!needBrowser(t)) return;
  const N = 5;
  const load = [];
  for (let i = 0; i < N; i++) load.push(await wsClient(`console-load-${i}`, ['console/load']));
  const sio = [await sioClient('console-sio-0'), await sioClient('console-sio-1')];
  const [room] = sio[0].rooms;
  assert.ok(room, 'an assistant socket is in a room');
  // N clients plus the console's own /ws connection; the 2 Socket.IO ones.
  await until(`${N} subscribers of console/load on the page`, async () => (await shownSubscribers('console/load')) === String(N));
  await until('the connection counts on the page', async () =>
    (await shown('#c-ws')) === String(N + 1) && (await shown('#c-socketio')) === '2');
  // Every /ws client is subscribed to `temperature` on connect.
  await until('temperature\'s subscribers', async () => (await shownSubscribers('temperature')) === String(N + 1));
  // Rooms and topics are one namespace: the sockets' room is listed too.
  await until(`the room ${room}`, async () => (await shownSubscribers(room)) === '2');
  await until('this node in the node list', async () =>
    (await shown(`#nodes tbody tr[data-node="interop-${pulso.port}"] td.num`)) === String(N + 3));
  assert.equal(await shown('#cluster'), 'statesingle node (no cluster configured)');
  assert.match(await shown('#presence'), /storesqlitestateok/);
  assert.match(await shown('#mqtt'), /off/);

  // They go down when clients leave.
  load.pop().close();
  load.pop().close();
  sio.pop().socket.close();
  await until('the counts after 3 clients left', async () =>
    (await shownSubscribers('console/load')) === String(N - 2)
    && (await shown('#c-ws')) === String(N - 1)
    && (await shown('#c-socketio')) === '1'
    && (await shownSubscribers(room)) === '1');
  for (const c of load) c.close();
  for (const s of sio) s.socket.close();
  await until('the load gone from the page', async () => (await shownSubscribers('console/load')) === null);
});

test('the live tail follows its filter', async (t) => {
  if (!needBrowser(t)) return;
  await pulso.post('/api/publish', { topic: 'orders/1', event: 'created', payload: { id: 1 } });
  const row = await until('orders/1 in the tail', () => page.evaluate(() => {
    const tr = [...document.querySelectorAll('#tail tbody tr')].find((r) => r.dataset.topic === 'orders/1');
    return tr ? [...tr.cells].map((c) => c.textContent) : null;
  }));
  assert.deepEqual(row.slice(1), ['orders/1', 'created', '{"id":1}']);

  await page.fill('#tail-filter', 'orders/+');
  await page.click('#tail-form button[type=submit]');
  // Published in this order on one connection: by the time orders/2 is
  // shown, the others have been seen and filtered out.
  await pulso.post('/api/publish', { topic: 'temperature/room-a', payload: { celsius: 22 } });
  await pulso.post('/api/publish', { topic: 'orders/2/lines', payload: 0 });
  await pulso.post('/api/publish', { topic: 'orders/2', payload: { id: 2 } });
  await until('orders/2 in the tail', () => page.evaluate(() =>
    [...document.querySelectorAll('#tail tbody tr')].some((r) => r.dataset.topic === 'orders/2')));
  const topics = await page.evaluate(() => [...document.querySelectorAll('#tail tbody tr')].map((r) => r.dataset.topic));
  assert.deepEqual(topics.filter((x) => x !== 'orders/2'), [], `only orders/+ after the filter: ${topics}`);
  // The demo chart still gets its feed (its subscription was not the tail's).
  const before = await page.evaluate(() => window.__console.series().demo.length);
  await until('more demo points', async () => (await page.evaluate(() => window.__console.series().demo.length)) > before);
});

test('its form publishes: a subscriber receives it', async (t) => {
  if (!needBrowser(t)) return;
  const sub = await wsClient('console-form-subscriber', ['console/form']);
  await page.fill('#p-topic', 'console/form');
  await page.fill('#p-event', 'ping');
  await page.fill('#p-payload', '{"n": 42, "text": "from the console"}');
  await page.click('#p-send');
  const m = await sub.next((x) => x.topic === 'console/form');
  assert.equal(m.event, 'ping');
  assert.deepEqual(m.payload, { n: 42, text: 'from the console' });
  await until('the answer on the page', async () => /^200 \{"recipients":\d+\}$/.test(await shown('#p-result')));
  // Not JSON: refused on the page, nothing sent.
  await page.fill('#p-payload', '{oops');
  await page.click('#p-send');
  await until('the refusal', async () => /not JSON/.test(await shown('#p-result')));
  await page.fill('#p-payload', '"after"');
  await page.click('#p-send');
  const next = await sub.next((x) => x.topic === 'console/form');
  assert.equal(next.payload, 'after', 'the refused payload was never published');
  sub.close();
});

test('no error on the page (scripts, styles and sockets all allowed by its CSP)', (t) => {
  if (!needBrowser(t)) return;
  assert.deepEqual(pageErrors, []);
});

// Only with PULSO_SCREENSHOTS=1: it makes pictures, it checks nothing new.
if (SCREENSHOTS) test('screenshots for docs/console', async (t) => {
  if (!needBrowser(t)) return;
  // A node with some life in it: clients on a few topics, two sensors
  // reporting at every 5th tick of the demo feed, for about 24 s.
  const held = [];
  for (const [topic, n] of [['orders', 4], ['assistant', 3], ['timer', 2]]) {
    for (let i = 0; i < n; i++) held.push(await wsClient(`shot-${topic}-${i}`, [topic]));
  }
  const shot = await sioClient('shot-sio');
  const start = await page.evaluate(() => window.__console.series().demo.length);
  for (let tick = 0; tick < 120; tick += 5) {
    await until('the next demo ticks', async () =>
      (await page.evaluate(() => window.__console.series().demo.length)) >= start + tick);
    const k = tick / 5;
    await pulso.post('/api/publish', { topic: 'temperature/room-a', payload: { celsius: 21 + Math.sin(k / 3) } });
    await pulso.post('/api/publish', { topic: 'temperature/room-b', payload: { celsius: 18.5 + Math.cos(k / 4) / 2 } });
    await pulso.post('/api/publish', { topic: `orders/${k}`, event: 'created', payload: { id: k, total: 10 * k } });
  }
  await until('the page to show the load', async () => (await shownSubscribers('orders')) === '4');
  const dir = fileURLToPath(new URL('../../docs/console/', import.meta.url));
  mkdirSync(dir, { recursive: true });
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: `${dir}console.png` });
  await page.locator('.grid').screenshot({ path: `${dir}console-state.png` });
  for (const c of held) c.close();
  shot.socket.close();
});
