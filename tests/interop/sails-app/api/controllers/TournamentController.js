// GET /tournament/:id: the tournament, and the page's socket joins the
// tournament's room to hear its check-ins.
const realtime = require('../../lib/realtime');

module.exports = {
  show(req, res) {
    const id = Number(req.param('id'));
    if (!Number.isInteger(id) || id <= 0) return res.badRequest({ error: { code: '400-1', message: 'bad id' } });
    realtime.join(req, res, `tournament_${id}`);
    return res.json({ id, name: `Tournament ${id}`, viewer: realtime.who(req) });
  },
};
