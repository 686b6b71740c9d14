// What a runnable block must do, by the name its marker gives
// (`<!-- run: NAME [OPTION ...] -->`). Each check says how pulso is
// configured for it (`server`), and `run(ctx)` drives and judges the block
// while it runs: ctx = { block, pulso, broker, snippet: { output, exit },
// token, sub, shell }.
import assert from 'node:assert/strict';
import { until, wsClient } from './lib/harness.mjs';

/** Options a marker may add after the check's name. */
export const OPTIONS = {
  'socket.io-client@2': 'a Node snippet whose `socket.io-client` is the 2.x client',
};

/** The demo feed: the client subscribes to `metricas/demo` and prints the ack and a message. */
const wsDemo = {
  describe: 'subscribes to metricas/demo and prints the ack and a demo message',
  server: { PULSO_DEMO_ENABLED: 'true', PULSO_DEMO_INTERVAL: '200ms' },
  async run({ snippet }) {
    await snippet.output.waitFor(/type['"]?:\s*['"]ack['"]/, 10000, 'the printed ack');
    await snippet.output.waitFor(
      /topic['"]?:\s*['"]metricas\/demo['"],[\s\S]{0,80}?payload['"]?:\s*\{\s*['"]?value['"]?:\s*-?[0-9.]+/,
      10000,
      'a printed metricas/demo message',
    );
  },
};

/**
 * Socket.IO with the Sails-style virtual request: the socket authenticates
 * (its presence row appears), is in `assistant_2`, and a `check_in`
 * broadcast to that room reaches exactly it. A snippet that logs must log
 * its rooms and the event.
 */
const sioNotifications = {
  describe: 'authenticates over Socket.IO, joins assistant_2, gets a check_in broadcast',
  claims: { tournamentId: 2 },
  async run({ block, pulso, snippet, sub }) {
    await until(
      `a presence row for assistant/${sub} (the snippet's authentication)`,
      async () => {
        const { body } = await pulso.get(`/api/presence?role=assistant&sub=${sub}`);
        return body.sockets?.some((s) => s.protocol === 'socketio');
      },
      15000,
    ).catch((e) => {
      throw new Error(`${e.message}; snippet output:\n${snippet.output.text}`);
    });
    const logs = block.code.includes('console.log');
    if (logs) await snippet.output.waitFor('assistant_2', 5000, 'the printed rooms');
    const data = { nick: `nick-${sub}` };
    const res = await pulso.post('/api/broadcast', { rooms: ['assistant_2'], event: 'check_in', data });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.equal(res.body.recipients, 1, 'the snippet\'s socket is the one socket in assistant_2');
    if (logs) await snippet.output.waitFor(`nick-${sub}`, 5000, 'the printed check_in event');
  },
};

/** The JSON lines of `text` that parse. */
function jsonLines(text) {
  return text.split('\n').flatMap((l) => {
    try {
      return [JSON.parse(l)];
    } catch {
      return [];
    }
  });
}

/** What a shell block publishes: curl's `-d` to /api/publish, and mosquitto_pub's -t/-m. */
function publishes(script) {
  const out = [];
  for (const line of script.split('\n')) {
    const curl = /\bcurl\b.*-d\s+'([^']*)'.*\/api\/publish/.exec(line);
    if (curl) {
      const { topic, payload } = JSON.parse(curl[1]);
      out.push({ topic, payload });
    }
    const mqtt = /\bmosquitto_pub\b.*-t\s+(\S+).*-m\s+('([^']*)'|(\S+))/.exec(line);
    if (mqtt) {
      const text = mqtt[3] ?? mqtt[4];
      let payload;
      try {
        payload = JSON.parse(text);
      } catch {
        payload = text;
      }
      out.push({ topic: mqtt[1], payload });
    }
  }
  return out;
}

/**
 * A shell block: a /ws observer (with the block's token, so auto-subscribed
 * like any client) subscribes to every topic the block publishes to; the
 * script must exit 0, print each output its comments show, and each
 * publish must reach the observer. A token it prints must open /ws.
 */
const shell = {
  describe: 'exits 0, prints the outputs its comments show, its publishes reach a /ws client',
  async before(ctx) {
    const { pulso, broker, shell: parsed } = ctx;
    ctx.observer = await wsClient(pulso, ctx.token);
    ctx.published = publishes(parsed.script);
    for (const topic of new Set(ctx.published.map((p) => p.topic))) await ctx.observer.sub(topic);
    if (broker && pulso.env.PULSO_MQTT_URL) {
      // The bridge subscribes on the broker once connected; a publish before
      // its SUBACK would be lost. Its filters go in one SUBSCRIBE, so once a
      // probe on the last one arrives, the block's topics are subscribed.
      await ctx.observer.sub('pulso-docs/probe');
      await until(
        "the MQTT bridge's subscriptions",
        async () => {
          await broker.publish('pulso-docs/probe', '1');
          return ctx.observer.messages.some((m) => m.topic === 'pulso-docs/probe');
        },
        15000,
      );
    }
  },
  async run(ctx) {
    const { snippet, shell: parsed, observer, pulso } = ctx;
    const { code, signal } = await snippet.exit;
    assert.equal(code, 0, `the script exits 0 (signal ${signal}); output:\n${snippet.output.text}`);
    const printed = jsonLines(snippet.output.text);
    for (const { command, output } of parsed.expected) {
      assert.ok(
        printed.some((p) => JSON.stringify(p) === JSON.stringify(output)),
        `\`${command}\` prints ${JSON.stringify(output)}; output:\n${snippet.output.text}`,
      );
    }
    for (const { topic, payload } of ctx.published) {
      await until(
        `${topic} ${JSON.stringify(payload)} at the /ws client`,
        () =>
          observer.messages.some((m) => m.topic === topic && JSON.stringify(m.payload) === JSON.stringify(payload)),
        5000,
      ).catch((e) => {
        throw new Error(`${e.message}; it got:\n${observer.output.text}`);
      });
    }
    for (const jwt of snippet.output.text.match(/\beyJ[\w-]+\.[\w-]+\.[\w-]+/g) ?? []) {
      const client = await wsClient(pulso, jwt);
      client.close();
    }
    observer.close();
  },
};

/**
 * docs/mqtt.md's sensor: after the block, a /ws client that connects gets
 * the kept value of `temperature`, and after `sub temperature/#` the ack
 * and the other kept values: the lines of the block that follows (`ts`
 * aside).
 */
const mqttKeptValues = {
  describe: `${shell.describe}; then a new /ws client gets the next block's lines`,
  before: shell.before,
  async run(ctx) {
    await shell.run(ctx);
    const expected = jsonLines(ctx.block.next.code);
    assert.ok(expected.length > 0, 'the next block lists what the client gets');
    const client = await wsClient(ctx.pulso, ctx.token);
    const first = expected.findIndex((m) => m.type === 'ack');
    await until('the kept value on connect', () => client.messages.length >= first, 5000);
    client.send({ type: 'sub', topic: 'temperature/#', id: 1 });
    await until(`${expected.length} messages`, () => client.messages.length >= expected.length, 5000).catch(
      (e) => {
        throw new Error(`${e.message}; got:\n${client.output.text}`);
      },
    );
    const strip = (m) => {
      const { ts, ...rest } = m;
      if (m.topic !== undefined) assert.equal(typeof ts, 'number', `ts in ${JSON.stringify(m)}`);
      return rest;
    };
    assert.deepEqual(client.messages.map(strip), expected.map(strip));
    client.close();
  },
};

export const CHECKS = {
  'ws-demo': wsDemo,
  'sio-notifications': sioNotifications,
  sh: shell,
  'mqtt-kept-values': mqttKeptValues,
};
