//! The `pulso` binary: the command line (`pulso::cli`) reads the settings
//! and runs the operator verbs; serving goes through the library's public
//! API, as an application's would.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use pulso::cli::{self, Invocation};
use pulso::{Builder, StartError};

fn main() -> ExitCode {
    let (settings, config) = match cli::parse() {
        Invocation::Exit(code) => return code,
        Invocation::Serve(settings, config) => (settings, config),
    };
    cli::init_logging(&config);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(Builder::from_layered(settings)))
}

/// Serves until SIGINT or SIGTERM (SIGHUP reloads the TLS certificate). The exit code is 2 for invalid
/// configuration, and for a cluster node whose `node_id` a live node holds
/// (starting again unchanged cannot help either way).
async fn serve(builder: Builder) -> ExitCode {
    // Before anything listens: a SIGTERM from the moment clients can
    // connect stops the server gracefully.
    let signalled = cli::wait_for_signal();
    let hangups = cli::hangups();
    let server = match builder.build().await {
        Ok(s) => s,
        Err(e @ (StartError::Config(_) | StartError::NodeInUse(_))) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    cli::announce(&server);
    cli::reload_on_hangup(&server, hangups);
    let pulso = server.handle();
    tokio::spawn(async move {
        signalled.await;
        // Stop first: nothing after this may keep the server running.
        pulso.shutdown();
        tracing::info!("signal received");
    });
    match server.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
