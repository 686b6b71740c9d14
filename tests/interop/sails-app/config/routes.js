// The app's routes. Pages reach them over their socket (sails.io.js
// `io.socket.get('/tournament/2')`), and over plain HTTP too.
module.exports.routes = {
  // What the app answered itself before pulso: the seed's authentication
  // (behind pulso, pulso answers this url and it never reaches the app).
  'GET /notifications': 'NotificationsController.connect',
  'POST /notifications': 'NotificationsController.connect',

  'GET /tournament/:id': 'TournamentController.show',
  'POST /checkin': 'CheckinController.create',
};
