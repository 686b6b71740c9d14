// Shared helper for the interop tests: starts the real pulso binary on a free
// port with a known secret, waits until it answers /healthz, mints tokens,
// and stops it. PULSO_BIN names the binary (default: the debug build).
import { spawn } from 'node:child_process';
import { createServer as createHttpServer } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import jwt from 'jsonwebtoken';
import { closeAll } from './clients.mjs';
import { freePort, spawnPulso, until } from './common.mjs';

export { freePort, until };

export const SECRET = 'interop-secret';
const here = dirname(fileURLToPath(import.meta.url));
const defaultBin = resolve(
  process.env.CARGO_TARGET_DIR || resolve(here, '../../../target'),
  'debug/pulso',
);

/** Resolves with the first `event` of `emitter` (or rejects after `ms`). */
export function once(emitter, event, ms = 5000) {
  return new Promise((res, rej) => {
    const t = setTimeout(() => rej(new Error(`timed out waiting for '${event}'`)), ms);
    const on = emitter.once ? 'once' : 'on';
    emitter[on](event, (...args) => {
      clearTimeout(t);
      res(args.length > 1 ? args : args[0]);
    });
  });
}

export function token(role, sub, extra = {}, opts = { expiresIn: '1h' }) {
  return jwt.sign({ role, sub, ...extra }, SECRET, opts);
}

/**
 * A request over HTTPS trusting only `ca` (Node's fetch cannot be given a
 * CA): resolves with { status, headers, text }.
 */
export function httpsFetch(url, { method = 'GET', headers = {}, body, ca }) {
  return new Promise((res, rej) => {
    const req = httpsRequest(url, { method, headers, ca }, (r) => {
      let text = '';
      r.on('data', (d) => (text += d));
      r.on('end', () => res({ status: r.statusCode, headers: r.headers, text }));
    });
    req.on('error', rej);
    req.setTimeout(5000, () => req.destroy(new Error(`no answer from ${url}`)));
    req.end(body);
  });
}

/**
 * Starts pulso. `env` adds PULSO_* settings. With `ca` (the certificate
 * pulso's PULSO_TLS_CERT_FILE chains to), pulso is reached over HTTPS and
 * WSS trusting that CA only. Returns { url, wsUrl, port, stop, post, get, logs }.
 */
export async function startPulso(env = {}, { ca } = {}) {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'pulso-interop-'));
  const url = `${ca ? 'https' : 'http'}://127.0.0.1:${port}`;
  const send = async (target, init) => {
    if (ca) return httpsFetch(target, { ...init, ca });
    const res = await fetch(target, init);
    return { status: res.status, headers: res.headers, text: await res.text() };
  };
  const pulso = await spawnPulso(process.env.PULSO_BIN || defaultBin, {
    cwd: dir,
    port,
    secret: SECRET,
    name: 'interop',
    env,
    healthy: async () => (await send(`${url}/healthz`, {})).status === 200,
  });
  const admin = token('admin', 'interop-admin');
  const request = async (method, path, body, bearer = admin) => {
    const res = await send(url + path, {
      method,
      headers: { 'content-type': 'application/json', ...(bearer ? { authorization: `Bearer ${bearer}` } : {}) },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });
    let json;
    try { json = JSON.parse(res.text); } catch { json = res.text; }
    return { status: res.status, body: json };
  };
  return {
    ...pulso,
    port,
    url,
    dir,
    wsUrl: `${ca ? 'wss' : 'ws'}://127.0.0.1:${port}/ws`,
    post: (path, body, bearer) => request('POST', path, body, bearer),
    get: (path, bearer) => request('GET', path, undefined, bearer),
  };
}

/**
 * One pulso for a test file: started with `env` before its tests; after
 * them stopped (it must exit 0 on SIGTERM), then every client the tests
 * put in `opened` closed. Returns { pulso, opened }; `pulso` has the
 * fields of `startPulso`'s result once the file's `before` has run.
 */
export function pulsoForFile(env = {}) {
  const pulso = {};
  const opened = [];
  before(async () => {
    Object.assign(pulso, await startPulso(env));
  });
  after(async () => {
    try {
      if (pulso.stop) assert.equal(await pulso.stop(), 0, 'pulso exits 0 on SIGTERM');
    } finally {
      closeAll(opened);
    }
  });
  return { pulso, opened };
}

/**
 * Loads `url` in headless Chromium and returns { stdout, stderr }; stdout is
 * the DOM once the page's load event has fired (killed after 30 s).
 */
export function dumpDom(chromium, url) {
  return new Promise((resolve) => {
    const child = spawn(chromium, ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--dump-dom', url]);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const kill = setTimeout(() => child.kill('SIGKILL'), 30000);
    child.on('close', () => { clearTimeout(kill); resolve({ stdout, stderr }); });
  });
}

/**
 * Serves `page` from another origin (plus `extra`: path -> [content type,
 * body], or path -> a `(req, res)` handler the page calls to have the test
 * act meanwhile), loads it in headless Chromium and returns the JSON the
 * page wrote after `marker` in its `<pre id="out">`. `/slow` answers after 3 s: a page
 * that includes `<img src="/slow">` holds its load event (and so
 * --dump-dom) until its socket has had time to finish. `port` serves the
 * page from that port (an origin known in advance), else from a free one.
 */
export async function runPage(chromium, page, marker, extra = {}, port = 0) {
  const site = createHttpServer((req, res) => {
    if (typeof extra[req.url] === 'function') return extra[req.url](req, res);
    if (extra[req.url]) {
      const [type, body] = extra[req.url];
      res.setHeader('content-type', type);
      return res.end(body);
    }
    if (req.url === '/slow') return setTimeout(() => res.end(), 3000);
    res.setHeader('content-type', 'text/html');
    res.end(page);
  });
  await new Promise((r) => site.listen(port, '127.0.0.1', r));
  try {
    // Not spawnSync: this process serves the page meanwhile.
    const run = await dumpDom(chromium, `http://127.0.0.1:${site.address().port}/`);
    const m = new RegExp(`<pre id="out">${marker} ([^<]*)</pre>`).exec(run.stdout.replaceAll('&quot;', '"'));
    if (!m) throw new Error(`the page did not finish: ${run.stdout.slice(0, 500)} ${run.stderr.slice(-300)}`);
    return JSON.parse(m[1]);
  } finally {
    site.close();
  }
}
