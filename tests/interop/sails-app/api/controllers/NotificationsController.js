// The seed's `connect` action (seeds/004): verify the JWT in
// `jwt-api-key`, join the socket to its role's room, answer with the
// socket id and rooms. Behind pulso this url is pulso's own.
const jwt = require('jsonwebtoken');

module.exports = {
  connect(req, res) {
    if (!req.isSocket) return res.badRequest({ error: { code: '400-1', message: 'sockets only' } });
    let claims;
    try {
      claims = jwt.verify(String(req.param('jwt-api-key') || ''), sails.config.custom.jwtSecret);
    } catch (e) {
      return res.status(401).json({ error: { code: '401-2', message: e.message } });
    }
    req.socket.identity = { sub: String(claims.sub), role: claims.role };
    sails.sockets.join(req, claims.role);
    return res.json({ socketId: sails.sockets.getId(req), rooms: [claims.role] });
  },
};
