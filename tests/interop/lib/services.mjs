// The machine's programs an interop test runs besides pulso (nginx,
// redis-server, openssl, Chromium): finding them, skipping a test without
// them (a failure under PULSO_REQUIRE_SERVICES=1, as .ci/run sets), and
// running them so that none outlives the test process.
import { spawn, execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { until } from './common.mjs';

/** `name` on PATH or in the usual sbin/bin directories, or null. */
export function findBinary(name) {
  try {
    return execFileSync('which', [name], { encoding: 'utf8' }).trim();
  } catch { /* not on PATH */ }
  for (const dir of ['/usr/sbin', '/usr/bin', '/usr/local/sbin', '/usr/local/bin']) {
    if (existsSync(join(dir, name))) return join(dir, name);
  }
  return null;
}

/**
 * The paths of the programs `names` (each also its Debian package's
 * name), as { bins: name → path, missing: null }; or, at the first one
 * not found, `missing` says so.
 */
export function findBinaries(...names) {
  const bins = {};
  for (const name of names) {
    bins[name] = findBinary(name);
    if (!bins[name]) return { bins, missing: `no ${name} on this machine (apt-get install ${name})` };
  }
  return { bins, missing: null };
}

/** The machine's Chromium binary, or null when there is none. */
export function findChromium() {
  for (const name of ['chromium', 'chromium-browser', 'google-chrome']) {
    const bin = findBinary(name);
    if (bin) return bin;
  }
  return null;
}

/**
 * True when nothing is `missing` (a reason, or null). Else the test `t` is
 * skipped with that reason and this returns false; under
 * PULSO_REQUIRE_SERVICES=1 (.ci/run), where every test must really run, it
 * throws instead.
 */
export function presentOr(t, missing) {
  if (!missing) return true;
  if (process.env.PULSO_REQUIRE_SERVICES === '1') throw new Error(`${missing} (PULSO_REQUIRE_SERVICES=1)`);
  t.skip(missing);
  return false;
}

/** The machine's Chromium binary; else null and `t` skipped (see `presentOr`). */
export function chromiumOr(t) {
  const chromium = findChromium();
  return presentOr(t, chromium ? null : 'no chromium on this machine (apt-get install chromium)') ? chromium : null;
}

/**
 * Writes a self-signed certificate for 127.0.0.1 and localhost, valid one
 * day, with common name `cn`, to the files `cert` and `key`.
 */
export function selfSignedCert(openssl, { cert, key, cn }) {
  execFileSync(openssl, ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
    '-nodes', '-days', '1', '-subj', `/CN=${cn}`, '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
    '-keyout', key, '-out', cert], { stdio: 'pipe' });
}

// Processes started and not stopped yet (pid → signal), killed should this
// process end without running its `after` hooks. A pulso whose stdout is
// gone may not act on SIGTERM, hence SIGKILL for it; nginx's master gets
// SIGTERM, so that it stops its workers.
const running = new Map();
let guarded = false;
function killRunning() {
  for (const [pid, signal] of running) {
    try { process.kill(pid, signal); } catch { /* gone */ }
  }
  running.clear();
}

/** Has `pid` sent `signal` should this process end first (until `forget`). */
export function killOnExit(pid, signal) {
  if (!guarded) {
    guarded = true;
    process.on('exit', killRunning);
    // The runner reading this file's report went away (`node --test … |
    // head`): exit, so that the line above runs (an EPIPE left alone ends
    // the process without 'exit').
    process.stdout.on('error', () => process.exit(1));
    for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
      process.once(signal, () => {
        killRunning();
        process.kill(process.pid, signal);
      });
    }
  }
  running.set(pid, signal);
}

export function forget(pid) {
  running.delete(pid);
}

/**
 * Spawns a helper process and records its output; `stop()` ends it and
 * removes its working directory, `options.cwd`. `lastSignal` is what it
 * gets should this process end first.
 */
export function spawnService(bin, args, options = {}, lastSignal = 'SIGKILL') {
  const child = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'], ...options });
  if (child.pid) killOnExit(child.pid, lastSignal);
  let logs = '';
  child.on('error', (e) => (logs += `cannot start ${bin}: ${e.message}\n`));
  child.stdout.on('data', (d) => (logs += d));
  child.stderr.on('data', (d) => (logs += d));
  const exited = new Promise((res) => child.on('close', (code, signal) => {
    forget(child.pid);
    res({ code, signal });
  }));
  return {
    logs: () => logs,
    running: () => child.exitCode === null && child.signalCode === null,
    /** Ends it and removes its working directory; resolves with { code, signal }. */
    async stop(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      const status = await exited;
      if (options.cwd) rmSync(options.cwd, { recursive: true, force: true });
      return status;
    },
  };
}

/** A fresh directory for an nginx of a test, readable by its workers. */
export function nginxDir(what) {
  const dir = mkdtempSync(join(tmpdir(), `pulso-${what}-`));
  chmodSync(dir, 0o755); // nginx's workers may run as another user
  return dir;
}

/**
 * Runs nginx `bin` on `dir`, which holds the site's config as pulso.conf
 * (with its access log in `dir`/access.log), under a main config of its
 * own: what /etc/nginx/nginx.conf is to a committed site file. Resolves
 * once `ready()` is true (`what` names that wait), with the service (see
 * `spawnService`; `stop()` removes `dir`) and `accessLog()`; stopped if
 * it never is.
 */
export async function startNginx(bin, dir, what, ready) {
  writeFileSync(join(dir, 'nginx.conf'), `daemon off;
master_process on;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log stderr warn;
events { worker_connections 1024; }
http {
    client_body_temp_path ${dir}/body;
    proxy_temp_path ${dir}/proxy;
    fastcgi_temp_path ${dir}/fastcgi;
    uwsgi_temp_path ${dir}/uwsgi;
    scgi_temp_path ${dir}/scgi;
    include ${dir}/pulso.conf;
}
`);
  const nginx = spawnService(bin, ['-p', dir, '-c', join(dir, 'nginx.conf'), '-e', 'stderr'], { cwd: dir }, 'SIGTERM');
  try {
    await until(what, async () => {
      if (!nginx.running()) throw new Error(`nginx exited:\n${nginx.logs()}`);
      try {
        return await ready();
      } catch {
        return false;
      }
    }, 10000);
  } catch (e) {
    await nginx.stop();
    throw e;
  }
  return { ...nginx, accessLog: () => readFileSync(join(dir, 'access.log'), 'utf8') };
}
