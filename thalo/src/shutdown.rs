//! One way to stop everything that runs until told otherwise: subscriptions, the relay
//! and Kafka consumers.

use std::future::Future;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::{info, warn};

/// A shutdown signal, shared by clones: triggering any clone stops everything that was
/// given one.
///
/// [`Subscription::run`](crate::Subscription::run), `PgSubscription::run`,
/// `KafkaRelay::run` and `KafkaConsumer::run` all take one (anything that converts into
/// it: a [`CancellationToken`] works as is). Get one from
/// [`on_signal`](Shutdown::on_signal) in a service (Ctrl-C or SIGTERM), from
/// [`new`](Shutdown::new) to trigger it yourself, or from [`when`](Shutdown::when) to
/// trigger it when a future completes.
///
/// ```
/// use thalo::Shutdown;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let shutdown = Shutdown::new();
/// let worker = tokio::spawn({
///     let shutdown = shutdown.clone();
///     async move {
///         shutdown.triggered().await;
///         "stopped"
///     }
/// });
/// shutdown.trigger();
/// assert!(shutdown.is_triggered());
/// assert_eq!(worker.await.unwrap(), "stopped");
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// A signal that only [`trigger`](Shutdown::trigger) sets off.
    pub fn new() -> Self {
        Self::default()
    }

    /// A signal that Ctrl-C (SIGINT) or, on Unix, SIGTERM sets off: what a service
    /// passes to everything it runs, so that `docker stop` or Kubernetes stop it
    /// gracefully.
    ///
    /// Must be called inside a Tokio runtime (it spawns the task that waits for the
    /// signal); outside one, it logs a warning and returns a signal that only
    /// [`trigger`](Shutdown::trigger) sets off.
    pub fn on_signal() -> Self {
        let shutdown = Shutdown::new();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!("Shutdown::on_signal called outside a Tokio runtime; signals will not stop anything");
            return shutdown;
        };
        let trigger = shutdown.clone();
        runtime.spawn(async move {
            tokio::select! {
                () = wait_for_signal() => info!("shutdown signal received"),
                // Triggered by hand: stop listening.
                () = trigger.triggered() => return,
            }
            trigger.trigger();
        });
        shutdown
    }

    /// A signal set off when `future` completes (or by [`trigger`](Shutdown::trigger)).
    ///
    /// Must be called inside a Tokio runtime (it spawns the task that awaits `future`);
    /// outside one, it logs a warning and returns a signal that only
    /// [`trigger`](Shutdown::trigger) sets off.
    pub fn when<F>(future: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let shutdown = Shutdown::new();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!(
                "Shutdown::when called outside a Tokio runtime; the future will not stop anything"
            );
            return shutdown;
        };
        let trigger = shutdown.clone();
        runtime.spawn(async move {
            tokio::select! {
                () = future => trigger.trigger(),
                () = trigger.triggered() => {}
            }
        });
        shutdown
    }

    /// Sets off the signal: everything holding a clone (or a
    /// [`child`](Shutdown::child)) stops. Triggering twice does nothing more.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether the signal has been set off.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once the signal has been set off (at once if it has).
    pub fn triggered(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// A signal set off with this one, or on its own: stop one part without stopping the
    /// rest.
    #[must_use]
    pub fn child(&self) -> Shutdown {
        Shutdown {
            token: self.token.child_token(),
        }
    }

    /// The underlying [`CancellationToken`].
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Converts into the underlying [`CancellationToken`].
    pub fn into_token(self) -> CancellationToken {
        self.token
    }
}

impl From<CancellationToken> for Shutdown {
    fn from(token: CancellationToken) -> Self {
        Shutdown { token }
    }
}

impl From<&CancellationToken> for Shutdown {
    fn from(token: &CancellationToken) -> Self {
        Shutdown {
            token: token.clone(),
        }
    }
}

impl From<&Shutdown> for Shutdown {
    fn from(shutdown: &Shutdown) -> Self {
        shutdown.clone()
    }
}

impl From<Shutdown> for CancellationToken {
    fn from(shutdown: Shutdown) -> Self {
        shutdown.token
    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn when_triggers_after_the_future() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::when(async {
            let _ = rx.await;
        });
        assert!(!shutdown.is_triggered());
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), shutdown.triggered())
            .await
            .expect("triggered after the future completed");
    }

    #[tokio::test]
    async fn a_child_stops_with_its_parent_but_not_the_other_way() {
        let parent = Shutdown::new();
        let child = parent.child();
        child.trigger();
        assert!(!parent.is_triggered());
        let other = parent.child();
        parent.trigger();
        assert!(other.is_triggered());
    }

    #[tokio::test]
    async fn a_token_converts_both_ways() {
        let token = CancellationToken::new();
        let shutdown = Shutdown::from(&token);
        token.cancel();
        assert!(shutdown.is_triggered());
        assert!(CancellationToken::from(shutdown).is_cancelled());
    }

    #[tokio::test]
    async fn on_signal_can_be_triggered_by_hand() {
        let shutdown = Shutdown::on_signal();
        shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(1), shutdown.triggered())
            .await
            .expect("triggered");
    }
}
