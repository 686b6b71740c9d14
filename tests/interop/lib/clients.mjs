// What the interop tests do with a client once they have one: queue what
// it receives, send the seed's Sails `get /notifications` and wait for its
// ack, close every client a test file opened.

/** The Socket.IO namespace of the seed's notifications. */
export const NS = '/notifications';

/**
 * Queues every `event` of `emitter` (its first argument, passed through
 * `map`) and returns `next(ms)`: resolves with the oldest one not yet
 * taken, or rejects when none comes within `ms` (5 s unless told). `what`
 * names the event in that error.
 */
export function inbox(emitter, event, { map = (x) => x, what = `'${event}'` } = {}) {
  const queue = [];
  const waiters = [];
  emitter.on(event, (data) => {
    const v = map(data);
    const w = waiters.shift();
    if (w) w(v); else queue.push(v);
  });
  return (ms = 5000) =>
    queue.length
      ? Promise.resolve(queue.shift())
      : new Promise((res, rej) => {
          const waiter = (v) => { clearTimeout(t); res(v); };
          const t = setTimeout(() => {
            waiters.splice(waiters.indexOf(waiter), 1);
            rej(new Error(`no ${what} in time`));
          }, ms);
          waiters.push(waiter);
        });
}

/**
 * Gives `ws` (an npm `ws` client, before it opens) a queue of its JSON
 * messages: `next(ms)` (see `inbox`), `upTo(pred)`, every message up to and
 * including the first that `pred` accepts, `until(pred)`, that message,
 * and `sendJson(v)`. Returns `ws`.
 */
export function queueJson(ws) {
  const next = inbox(ws, 'message', { map: (data) => JSON.parse(data.toString()), what: '/ws message' });
  ws.next = next;
  ws.upTo = async (pred) => {
    const seen = [];
    for (;;) {
      const m = await next();
      seen.push(m);
      if (pred(m)) return seen;
    }
  };
  ws.until = async (pred) => (await ws.upTo(pred)).at(-1);
  ws.sendJson = (v) => ws.send(JSON.stringify(v));
  return ws;
}

/** Emits `event` with `payload` and resolves with its ack; rejects without one within `ms`. */
export function emitAck(socket, event, payload, ms = 5000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no ack for ${event} ${payload?.url ?? JSON.stringify(payload)}`)), ms);
    socket.emit(event, payload, (ack) => {
      clearTimeout(t);
      resolve(ack);
    });
  });
}

/**
 * The seed's authentication: the Sails virtual request `get /notifications`
 * with the token `tok` and `params` (a tournamentId); resolves with its ack.
 */
export function sailsAuth(socket, tok, params = {}) {
  return emitAck(socket, 'get', { url: NS, params: { 'jwt-api-key': tok, ...params } });
}

/** Closes every client in `opened` (each has `close()`), whatever it is in. */
export function closeAll(opened) {
  for (const s of opened) {
    try { s.close(); } catch { /* already closed */ }
  }
}
