// What the interop tests and the docs' snippet runner (tests/docs/lib/
// harness.mjs) both need: a free port, waiting for a condition, and the
// real pulso binary started on a port and stopped. tests/docs imports this
// file by path and has its own node_modules, so it imports Node's own
// modules only, never an npm package.
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';

export function freePort() {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', rej);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
  });
}

/** Waits for `check()` to return a truthy value, polling, up to `ms`. */
export async function until(what, check, ms = 5000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * Starts the pulso binary `bin` in `cwd`, listening on 127.0.0.1:`port`
 * with JWT secret `secret`, the demo feed off and node id `<name>-<port>`;
 * `env` adds or overrides PULSO_* settings. Resolves once `healthy()`
 * (which may throw while pulso is not up yet) returns true, within 15 s.
 * Returns { pid, logs, stop }; `stop()` sends SIGTERM and resolves with the
 * exit code.
 */
export async function spawnPulso(bin, { cwd, port, secret, name, env = {}, healthy }) {
  const child = spawn(bin, [], {
    cwd,
    env: {
      ...process.env,
      PULSO_LISTEN: `127.0.0.1:${port}`,
      PULSO_JWT_SECRET: secret,
      PULSO_DEMO_ENABLED: 'false',
      PULSO_NODE_ID: `${name}-${port}`,
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let logs = '';
  child.on('error', (e) => (logs += `cannot start ${bin}: ${e.message} (set PULSO_BIN)\n`));
  child.stdout.on('data', (d) => (logs += d));
  child.stderr.on('data', (d) => (logs += d));
  const exited = new Promise((res) => child.on('exit', (code) => res(code)));
  await until('pulso /healthz', async () => {
    if (child.exitCode !== null) throw new Error(`pulso exited early:\n${logs}`);
    try {
      return await healthy();
    } catch {
      return false;
    }
  }, 15000);
  return {
    pid: child.pid,
    logs: () => logs,
    /** SIGTERM and wait; resolves with the exit code. */
    async stop() {
      if (child.exitCode === null) child.kill('SIGTERM');
      return exited;
    },
  };
}
