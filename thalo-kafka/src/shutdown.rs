//! Graceful shutdown on Ctrl-C or SIGTERM.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A token that is cancelled when the process receives Ctrl-C (SIGINT) or, on Unix,
/// SIGTERM. Pass it to [`KafkaRelay::run`](crate::KafkaRelay::run) or
/// [`KafkaConsumer::run`](crate::KafkaConsumer::run); clone it to stop several at once.
///
/// Must be called inside a Tokio runtime (it spawns the task that waits for the
/// signal); outside one, it logs a warning and returns a token that is never cancelled.
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        warn!("shutdown_signal called outside a Tokio runtime; signals will not stop anything");
        return token;
    };
    let cancel = token.clone();
    runtime.spawn(async move {
        wait_for_signal().await;
        info!("shutdown signal received");
        cancel.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(err) => {
            warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
