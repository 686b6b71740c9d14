// What the snippet runner needs around a block: a real pulso (PULSO_BIN) on
// a free port, its own Mosquitto when the block talks MQTT, tokens made by
// `pulso token`, a /ws observer, and one way to run each kind of block
// (node, headless Chromium, python3 with `websockets`, bash), each giving
// its output as an `Output` the checks wait on.
import { spawn, execFile } from 'node:child_process';
import { Socket } from 'node:net';
import { createServer as createHttpServer } from 'node:http';
import { mkdtempSync, mkdirSync, writeFileSync, symlinkSync, existsSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import WebSocket from 'ws';
// By path: that file imports Node's own modules only, so it needs no
// node_modules of its own (this folder's are installed apart).
import { freePort, spawnPulso, until as pollUntil } from '../../interop/lib/common.mjs';

const here = dirname(fileURLToPath(import.meta.url));
export const DOCS_DIR = resolve(here, '..');
export const REPO = resolve(here, '../../..');
export const SECRET = 'docs-snippets-secret';
export const BIN =
  process.env.PULSO_BIN || resolve(process.env.CARGO_TARGET_DIR || join(REPO, 'target'), 'debug/pulso');

// Every file the runner writes is under one directory, removed on exit.
const ROOT = mkdtempSync(join(tmpdir(), 'pulso-docs-'));
process.on('exit', () => rmSync(ROOT, { recursive: true, force: true }));
let dirs = 0;
function tempDir(what) {
  const dir = join(ROOT, `${what}-${++dirs}`);
  mkdirSync(dir);
  return dir;
}

/** The addresses the docs use for a pulso and an MQTT broker. */
const DOC_SERVER = /\b(?:127\.0\.0\.1|localhost|pulso-host):1337\b/g;
const DOC_BROKER = /\b(?:127\.0\.0\.1|localhost):1883\b/g;

/** `code` with the docs' addresses replaced by the test's (those given). */
export function localize(code, { port, brokerPort }) {
  let out = port ? code.replace(DOC_SERVER, `127.0.0.1:${port}`) : code;
  if (brokerPort) out = out.replace(DOC_BROKER, `127.0.0.1:${brokerPort}`);
  return out;
}

/** Waits for `check()` to return a truthy value, polling, up to `ms` (10 s unless told). */
export const until = (what, check, ms = 10000) => pollUntil(what, check, ms);

/** Text that arrives over time (a process's output, a page's console). */
export class Output {
  constructor() {
    this.text = '';
    this.waiters = [];
  }

  push(chunk) {
    this.text += chunk;
    this.waiters = this.waiters.filter((w) => !w.test());
  }

  /** Resolves with the match of `pattern` (a RegExp or a string) once the text has it. */
  waitFor(pattern, ms = 10000, what = String(pattern)) {
    const match = () =>
      typeof pattern === 'string' ? (this.text.includes(pattern) ? [pattern] : null) : pattern.exec(this.text);
    return new Promise((res, rej) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        rej(new Error(`timed out waiting for ${what} in the snippet's output:\n${this.text}`));
      }, ms);
      const waiter = {
        test: () => {
          const m = match();
          if (m) {
            clearTimeout(timer);
            res(m);
          }
          return Boolean(m);
        },
      };
      if (!waiter.test()) this.waiters.push(waiter);
    });
  }
}

/** Runs `pulso ARGS` to completion with `env`; resolves with its stdout. */
export async function pulsoCli(args, env = {}) {
  const { stdout } = await promisify(execFile)(BIN, args, {
    env: { ...process.env, PULSO_JWT_SECRET: SECRET, ...env },
    timeout: 10000,
  });
  return stdout;
}

/** A token from `pulso token` (so signed as an operator would sign it). */
export async function mintToken(env, role, sub, claims = {}) {
  const args = ['token', '--role', role, '--sub', sub];
  for (const [k, v] of Object.entries(claims)) args.push('--claim', `${k}=${v}`);
  return (await pulsoCli(args, env)).trim();
}

/** Starts pulso with `env` on a free port; resolves once /healthz answers. */
export async function startPulso(env = {}) {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const pulso = await spawnPulso(BIN, {
    cwd: tempDir('pulso'),
    port,
    secret: SECRET,
    name: 'docs',
    env,
    healthy: async () => (await fetch(`${url}/healthz`)).ok,
  });
  const admin = await mintToken(env, 'admin', 'docs-admin');
  const request = async (method, path, body) => {
    const res = await fetch(url + path, {
      method,
      headers: { 'content-type': 'application/json', authorization: `Bearer ${admin}` },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let json;
    try {
      json = JSON.parse(text);
    } catch {
      json = text;
    }
    return { status: res.status, body: json };
  };
  return {
    port,
    url,
    env,
    admin,
    logs: pulso.logs,
    post: (path, body) => request('POST', path, body),
    get: (path) => request('GET', path),
    stop: pulso.stop,
  };
}

/** A Mosquitto of our own on a free port (the docs' 127.0.0.1:1883). */
export async function startBroker() {
  const port = await freePort();
  const dir = tempDir('mqtt');
  writeFileSync(
    join(dir, 'mosquitto.conf'),
    `allow_anonymous true\npersistence false\nlog_dest stderr\nlistener ${port} 127.0.0.1\n`,
  );
  const bin = ['/usr/sbin/mosquitto', '/usr/bin/mosquitto'].find(existsSync) || 'mosquitto';
  const child = spawn(bin, ['-c', join(dir, 'mosquitto.conf')], { stdio: ['ignore', 'ignore', 'pipe'] });
  let logs = '';
  child.stderr.on('data', (d) => (logs += d));
  child.on('error', (e) => (logs += `cannot start mosquitto: ${e.message}\n`));
  const exited = new Promise((res) => child.on('exit', (code) => res(code)));
  await until('mosquitto to listen', async () => {
    if (child.exitCode !== null) throw new Error(`mosquitto exited:\n${logs}`);
    return new Promise((res) => {
      const s = new Socket();
      s.once('connect', () => {
        s.destroy();
        res(true);
      });
      s.once('error', () => res(false));
      s.connect(port, '127.0.0.1');
    });
  });
  // mosquitto_pub and mosquitto_sub read default options from
  // $XDG_CONFIG_HOME/<name>: the snippets' bare commands reach this broker.
  const xdg = join(dir, 'xdg');
  mkdirSync(xdg);
  writeFileSync(join(xdg, 'mosquitto_pub'), `-p ${port}\n`);
  writeFileSync(join(xdg, 'mosquitto_sub'), `-p ${port}\n`);
  return {
    port,
    xdg,
    logs: () => logs,
    publish: (topic, message) =>
      promisify(execFile)('mosquitto_pub', ['-p', String(port), '-t', topic, '-m', message], { timeout: 5000 }),
    async stop() {
      if (child.exitCode === null) child.kill('SIGTERM');
      return exited;
    },
  };
}

/** A /ws client: `messages` (parsed), `output` (one JSON line each), `send`, `close`. */
export async function wsClient(pulso, token) {
  const ws = new WebSocket(`ws://127.0.0.1:${pulso.port}/ws?token=${encodeURIComponent(token)}`);
  const messages = [];
  const output = new Output();
  ws.on('message', (data) => {
    const text = data.toString();
    try {
      messages.push(JSON.parse(text));
    } catch {
      messages.push(text);
    }
    output.push(`${text}\n`);
  });
  await new Promise((res, rej) => {
    ws.once('open', res);
    ws.once('error', rej);
  });
  let id = 1000;
  return {
    messages,
    output,
    send: (msg) => ws.send(JSON.stringify(msg)),
    /** Subscribes and waits for the ack. */
    async sub(topic) {
      const n = ++id;
      ws.send(JSON.stringify({ type: 'sub', topic, id: n }));
      await output.waitFor(`{"type":"ack","id":${n}}`, 5000, `the ack of sub ${topic}`);
    },
    close: () => ws.close(),
  };
}

/** A child process whose stdout and stderr go to one Output. */
function run(cmd, args, opts) {
  const child = spawn(cmd, args, { ...opts, stdio: ['ignore', 'pipe', 'pipe'] });
  const output = new Output();
  child.stdout.on('data', (d) => output.push(d.toString()));
  child.stderr.on('data', (d) => output.push(d.toString()));
  child.on('error', (e) => output.push(`cannot start ${cmd}: ${e.message}\n`));
  const exit = new Promise((res) => child.on('close', (code, signal) => res({ code, signal })));
  return {
    output,
    exit,
    stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      return exit;
    },
  };
}

/**
 * Runs a Node snippet. Its packages resolve from tests/docs/node_modules;
 * `sio2` makes `socket.io-client` the 2.x client there. ES module when it
 * imports, CommonJS when it requires. `TOKEN` is a global (the docs' name
 * for the reader's token), as is `process.env.TOKEN`.
 */
export function runNode(code, { env, sio2 = false }) {
  const dir = tempDir('node');
  const modules = join(dir, 'node_modules');
  mkdirSync(modules);
  const installed = join(DOCS_DIR, 'node_modules');
  for (const name of ['ws', 'sails.io.js', 'socket.io-client']) {
    const target = name === 'socket.io-client' && sio2 ? 'sio2' : name;
    symlinkSync(join(installed, target), join(modules, name));
  }
  const esm = /^\s*import\s/m.test(code);
  const file = join(dir, esm ? 'snippet.mjs' : 'snippet.cjs');
  writeFileSync(file, code);
  writeFileSync(join(dir, 'globals.mjs'), 'globalThis.TOKEN = process.env.TOKEN;\n');
  return run(process.execPath, ['--import', join(dir, 'globals.mjs'), file], {
    cwd: dir,
    env: { ...process.env, ...env },
  });
}

let venv = null;
/** A virtualenv with `websockets` (tests/docs/requirements.txt), made once per run. */
export async function pythonWithWebsockets() {
  if (venv) return venv;
  const dir = tempDir('venv');
  const exec = promisify(execFile);
  await exec('python3', ['-m', 'venv', dir], { timeout: 60000 });
  await exec(join(dir, 'bin/pip'), ['install', '-q', '--disable-pip-version-check', '-r', join(DOCS_DIR, 'requirements.txt')], {
    timeout: 180000,
  });
  venv = join(dir, 'bin/python');
  return venv;
}

/** Runs a Python snippet with the venv's python3, unbuffered. */
export async function runPython(code, { env }) {
  const python = await pythonWithWebsockets();
  const dir = tempDir('py');
  writeFileSync(join(dir, 'snippet.py'), code);
  return run(python, [join(dir, 'snippet.py')], {
    cwd: dir,
    env: { ...process.env, ...env, PYTHONUNBUFFERED: '1' },
  });
}

/**
 * Runs a browser snippet in headless Chromium: a page served from another
 * origin loads socket.io-client 4's browser bundle (the global `io`),
 * defines `TOKEN`, and runs the snippet. Its
 * console.log lines come back as the Output. The page's load event (and so
 * Chromium's exit) is held until `stop()`.
 */
export async function runBrowser(code, { env }) {
  const output = new Output();
  let release;
  const held = new Promise((r) => (release = r));
  const bundle = readFileSync(join(DOCS_DIR, 'node_modules/socket.io-client/dist/socket.io.js'));
  const page = `<!doctype html><html><body><pre id="out"></pre>
<script>
  const send = (line) => fetch('/log', { method: 'POST', body: line });
  const show = (args) => args.map((a) => (typeof a === 'string' ? a : JSON.stringify(a))).join(' ');
  console.log = (...args) => send(show(args));
  console.error = (...args) => send('console.error: ' + show(args));
  window.addEventListener('error', (e) => send('page error: ' + e.message));
  var TOKEN = ${JSON.stringify(env.TOKEN)};
</script>
<script src="/client.js"></script>
<script>
${code}
</script>
<img src="/hold">
</body></html>`;
  const site = createHttpServer((req, res) => {
    if (req.url === '/log') {
      let body = '';
      req.on('data', (d) => (body += d));
      req.on('end', () => {
        output.push(`${body}\n`);
        res.end();
      });
      return;
    }
    if (req.url === '/client.js') {
      res.setHeader('content-type', 'text/javascript');
      return res.end(bundle);
    }
    if (req.url === '/hold') return held.then(() => res.end());
    res.setHeader('content-type', 'text/html');
    res.end(page);
  });
  await new Promise((r) => site.listen(0, '127.0.0.1', r));
  const chromium = ['chromium', 'chromium-browser', 'google-chrome'].find((b) =>
    (process.env.PATH || '').split(':').some((d) => existsSync(join(d, b))),
  );
  if (!chromium) throw new Error('no chromium on PATH');
  const child = run(
    chromium,
    [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      `--user-data-dir=${tempDir('chromium')}`,
      '--dump-dom',
      `http://127.0.0.1:${site.address().port}/`,
    ],
    {},
  );
  child.output.push = () => {}; // its DOM dump and noise are not the page's output
  return {
    output,
    exit: child.exit,
    async stop() {
      release();
      const kill = setTimeout(() => child.stop(), 10000);
      const r = await child.exit;
      clearTimeout(kill);
      site.close();
      return r;
    },
  };
}

/**
 * A shell block, split into what the runner does itself and the script it
 * runs with bash:
 * - a line that starts pulso with no verb (`cargo run [-q] [--release]` or
 *   `pulso`, optionally after VAR=value assignments and followed by `&`)
 *   is the server: the runner starts it with those variables, and the
 *   ones `export`ed above it;
 * - `mosquitto -d` is the broker: the runner starts its own;
 * - `cargo run [-q] [--release] -- VERB …` is `pulso VERB …`;
 * - a comment that is JSON, right after a command, is that command's
 *   expected output.
 */
export function parseShell(code) {
  const joined = code.replace(/\\\n\s*/g, ' ');
  const serverEnv = {};
  const exported = {};
  const script = [];
  const expected = [];
  let server = false;
  let broker = false;
  let lastCommand = null;
  for (const raw of joined.split('\n')) {
    const line = raw.trim();
    if (line === '') continue;
    if (line.startsWith('#')) {
      const text = line.slice(1).trim();
      if (lastCommand !== null && /^[[{]/.test(text)) {
        try {
          expected.push({ command: lastCommand, output: JSON.parse(text) });
          continue;
        } catch {
          /* a comment, not an output */
        }
      }
      continue;
    }
    const withoutComment = line.replace(/\s+#.*$/, '');
    const srv = /^((?:[A-Z_][A-Z0-9_]*=\S+\s+)*)(?:cargo run(?:\s+-q)?(?:\s+--release)?|pulso)\s*&?$/.exec(withoutComment);
    if (srv) {
      server = true;
      Object.assign(serverEnv, exported);
      for (const [, k, v] of srv[1].matchAll(/([A-Z_][A-Z0-9_]*)=(\S+)/g)) serverEnv[k] = v;
      lastCommand = null;
      continue;
    }
    if (/^mosquitto\s+-d\b/.test(withoutComment)) {
      broker = true;
      lastCommand = null;
      continue;
    }
    const exp = /^export\s+([A-Z_][A-Z0-9_]*)=(\S+)$/.exec(withoutComment);
    if (exp) exported[exp[1]] = exp[2];
    const command = line.replace(/^cargo run(?:\s+-q)?(?:\s+--release)?\s+--\s+/, 'pulso ');
    script.push(command);
    lastCommand = command;
  }
  return { server, serverEnv, broker, script: script.join('\n') + '\n', expected };
}

/** Runs a shell script with bash -e; `pulso` on PATH is PULSO_BIN. */
export function runShell(script, { env }) {
  const dir = tempDir('sh');
  const bin = join(dir, 'bin');
  mkdirSync(bin);
  symlinkSync(BIN, join(bin, 'pulso'));
  writeFileSync(join(dir, 'snippet.sh'), `set -euo pipefail\n${script}`);
  return run('bash', [join(dir, 'snippet.sh')], {
    cwd: dir,
    env: { ...process.env, ...env, PATH: `${bin}:${process.env.PATH}` },
  });
}
