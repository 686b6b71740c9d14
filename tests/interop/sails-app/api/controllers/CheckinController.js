// POST /checkin {tournamentId, nick}: records a check-in and tells the
// tournament's room.
const realtime = require('../../lib/realtime');

module.exports = {
  async create(req, res) {
    const me = realtime.who(req);
    if (!me) return res.status(401).json({ error: { code: '401-1', message: 'authenticate first' } });
    const tournamentId = Number(req.param('tournamentId'));
    const nick = req.param('nick');
    if (!Number.isInteger(tournamentId) || typeof nick !== 'string') {
      return res.status(409).json({ error: { code: '409-13', message: 'There was a problem with the checkin.' } });
    }
    const checkin = { tournamentId, nick, by: me.sub };
    await realtime.broadcast(`tournament_${tournamentId}`, 'checkin', { check_in_id: checkin });
    return res.status(201).json({ checkin });
  },
};
