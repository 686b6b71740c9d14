// The example Sails 1.x application of the interop test and of
// docs/socketio.md. `lift(options)` starts it in this process and resolves
// with the Sails instance.
const path = require('node:path');
const Sails = require('sails').constructor;

function lift({ port, jwtSecret, pulsoUrl = null, pulsoKey = null }) {
  const app = new Sails();
  return new Promise((resolve, reject) => {
    app.lift(
      {
        appPath: __dirname,
        port,
        environment: 'development',
        log: { level: 'error' },
        globals: { _: false, async: false, models: false, sails: true },
        // Only what the example uses: HTTP, the router, controllers and
        // sails-hook-sockets.
        hooks: {
          grunt: false, orm: false, pubsub: false, session: false, views: false,
          blueprints: false, i18n: false,
          // An installable hook, given here rather than found in the
          // app's own node_modules.
          sockets: require('sails-hook-sockets'),
        },
        custom: { jwtSecret, pulsoUrl, pulsoKey },
      },
      (err) => (err ? reject(err) : resolve(app)),
    );
  });
}

module.exports = { lift };

if (require.main === module) {
  lift({
    port: Number(process.env.PORT || 1338),
    jwtSecret: process.env.JWT_SECRET || 'change-me',
    pulsoUrl: process.env.PULSO_URL || null,
    pulsoKey: process.env.PULSO_API_KEY || null,
  }).then(() => console.log('sails app lifted'));
}
