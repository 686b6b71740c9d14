// Rooms and broadcasts, whoever holds the page's socket: the app itself
// (`sails.sockets`) or pulso in front of it (the request then carries
// `X-Pulso-Socket-Id`, and pulso's HTTP API broadcasts).

/** Who the socket is: pulso's verified identity, else the app's own. */
function who(req) {
  if (req.headers['x-pulso-sub']) {
    return { sub: req.headers['x-pulso-sub'], role: req.headers['x-pulso-role'] };
  }
  return (req.isSocket && req.socket.identity) || null;
}

/** `sails.sockets.join(req, room)`, or the same asked of pulso. */
function join(req, res, room) {
  if (req.headers['x-pulso-socket-id']) {
    const before = res.get('X-Pulso-Join');
    res.set('X-Pulso-Join', before ? `${before}, ${room}` : room);
  } else if (req.isSocket) {
    sails.sockets.join(req, room);
  }
}

/**
 * `sails.sockets.broadcast(room, event, data)`: to the sockets the app
 * holds, and through pulso's API to the sockets pulso holds.
 */
async function broadcast(room, event, data) {
  sails.sockets.broadcast(room, event, data);
  const { pulsoUrl, pulsoKey } = sails.config.custom;
  if (pulsoUrl) {
    const res = await fetch(`${pulsoUrl}/api/broadcast`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${pulsoKey}` },
      body: JSON.stringify({ rooms: room, event, data }),
    });
    if (!res.ok) throw new Error(`pulso broadcast: ${res.status} ${await res.text()}`);
  }
}

module.exports = { who, join, broadcast };
