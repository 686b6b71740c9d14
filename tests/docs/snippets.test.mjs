// Runs every block of README.md and docs/*.md marked `<!-- run: CHECK -->`
// against a real pulso (PULSO_BIN), one fresh server per block, and judges
// it with CHECK (checks.mjs). A js block that imports or requires runs in
// node (packages from tests/docs/package.json), one that does not is a
// page's script (headless Chromium, socket.io-client 4's browser bundle as
// the global `io`); python blocks run in python3 with `websockets`; sh and
// bash blocks in bash. The block's text is run as written, but for:
// the docs' server address (127.0.0.1, localhost or pulso-host, port 1337)
// and broker address (127.0.0.1:1883) become the test's; `TOKEN` (a JS
// global, $TOKEN, process.env.TOKEN, os.environ["TOKEN"]) is a token from
// `pulso token --role assistant --sub <unique> --claim tournamentId=2`,
// `ADMIN` one of role admin; shell blocks as lib/harness.mjs's parseShell
// says (the runner starts pulso and Mosquitto itself).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CHECKS } from './checks.mjs';
import { parseDocs } from './lib/markdown.mjs';
import {
  REPO,
  localize,
  mintToken,
  parseShell,
  runBrowser,
  runNode,
  runPython,
  runShell,
  startBroker,
  startPulso,
} from './lib/harness.mjs';

const { blocks } = parseDocs(REPO);
const runnable = blocks.filter((b) => b.marker?.kind === 'run');

test('the docs have runnable blocks', () => {
  assert.ok(runnable.length > 0, 'no block is marked <!-- run: … -->');
});

/** How a block runs: node, browser, python or sh (null: no runner for its language). */
function kindOf(block) {
  if (['js', 'javascript', 'mjs', 'cjs'].includes(block.lang)) {
    return /^\s*import\s|\brequire\(/m.test(block.code) ? 'node' : 'browser';
  }
  if (['python', 'py'].includes(block.lang)) return 'python';
  if (['sh', 'bash', 'shell'].includes(block.lang)) return 'sh';
  return null;
}

let n = 0;
for (const block of runnable) {
  const kind = kindOf(block);
  const check = CHECKS[block.marker.check];
  const name = `${block.file}:${block.line} (${block.lang}, ${kind}): ${block.marker.check}`;
  test(name, { timeout: 120000 }, async () => {
    assert.ok(kind, `no runner for \`${block.lang}\` blocks`);
    assert.ok(check, `unknown check ${block.marker.check}`);
    const sub = `docs-${process.pid}-${++n}`;
    const shell = kind === 'sh' ? parseShell(block.code) : null;
    const mqtt = /mosquitto|:1883\b/.test(block.code);
    const broker = mqtt ? await startBroker() : null;
    let pulso = null;
    let snippet = null;
    try {
      const serverEnv = {};
      for (const [k, v] of Object.entries({ ...check.server, ...shell?.serverEnv })) {
        serverEnv[k] = localize(v, { brokerPort: broker?.port });
      }
      if (serverEnv.PULSO_MQTT_URL) {
        serverEnv.PULSO_MQTT_TOPICS = `${serverEnv.PULSO_MQTT_TOPICS ?? 'temperature/#'},pulso-docs/probe`;
      }
      pulso = await startPulso(serverEnv);
      const token = await mintToken(serverEnv, 'assistant', sub, check.claims ?? {});
      const env = { TOKEN: token, ADMIN: pulso.admin };
      if (broker) env.XDG_CONFIG_HOME = broker.xdg;
      const ctx = { block, pulso, broker, token, sub, shell };
      if (check.before) await check.before(ctx);
      const code = localize(shell ? shell.script : block.code, { port: pulso.port, brokerPort: broker?.port });
      if (kind === 'node') {
        snippet = runNode(code, { env, sio2: block.marker.options.includes('socket.io-client@2') });
      } else if (kind === 'browser') {
        snippet = await runBrowser(code, { env });
      } else if (kind === 'python') {
        snippet = await runPython(code, { env });
      } else {
        snippet = runShell(code, { env });
      }
      ctx.snippet = snippet;
      try {
        await check.run(ctx);
      } catch (e) {
        e.message += `\n--- pulso's log:\n${pulso.logs().slice(-3000)}`;
        throw e;
      }
    } finally {
      await snippet?.stop();
      if (pulso) await pulso.stop();
      await broker?.stop();
    }
  });
}
