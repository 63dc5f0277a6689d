//! Waking readers when events are appended: `LISTEN` on the store's channel, with a
//! polling fallback.
//!
//! Every append runs `pg_notify('<schema>_events', last_position)` in its transaction, so
//! the notification is delivered when (and only if) the events commit. One listener per
//! store (on its own connection, not one of the pool's) turns notifications into a
//! counter that waiters watch. Notifications are hints, never the source of truth: a
//! waiter always asks the database whether there is something to read, and a lost
//! notification (a reconnect, a store with notify off) only costs latency, bounded by the
//! caller's timeout and the poll interval. When the database holds committed events that
//! are still behind the read horizon (an older transaction is running, see `global.rs`),
//! no notification will announce the horizon moving, so the waiter polls with a short
//! backoff instead.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::{watch, OnceCell};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::global::Peek;
use crate::store::Inner;

/// Whether and how appends `NOTIFY` the channel `<schema>_events` with their last
/// position, for the outbox relay and subscriptions that `LISTEN` on it.
///
/// Notifications are only wake-ups: listeners also poll, so a lost notification costs
/// latency, never events.
///
/// Choosing: Postgres serialises the commits of all transactions that notify (each holds
/// a cluster-wide lock on the notification queue from its pre-commit until its commit
/// is durable, WAL flush included), so [`InTransaction`](NotifyMode::InTransaction)
/// caps concurrent appends at roughly one commit per WAL flush.
/// [`AfterCommit`](NotifyMode::AfterCommit) keeps commits concurrent (group commit works
/// again) for one more round trip per append, and loses the notification if the process
/// dies between the two statements. The benchmark measures all three.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotifyMode {
    /// No notifications; listeners poll.
    Off,
    /// `pg_notify` in the append's own statement and transaction: delivered exactly when
    /// the events commit. The default.
    #[default]
    InTransaction,
    /// `pg_notify` in a separate statement right after the append committed.
    /// [`append_in`](crate::PgEventStore::append_in) cannot know when the caller commits
    /// and notifies in the caller's transaction instead.
    AfterCommit,
}

impl NotifyMode {
    /// Whether appends notify at all.
    pub fn is_on(self) -> bool {
        self != NotifyMode::Off
    }
}

/// The store's shared listener, started on first use.
#[derive(Debug, Default)]
pub(crate) struct Notifier {
    /// Counts notifications (and reconnects, which may have lost some).
    wakeups: OnceCell<watch::Receiver<u64>>,
}

impl Notifier {
    /// A receiver that has seen every wake-up so far, or `None` when no listener can be
    /// started (callers poll instead).
    async fn subscribe(&self, pool: &PgPool, channel: &str) -> Option<watch::Receiver<u64>> {
        match self.wakeups.get_or_try_init(|| listen(pool, channel)).await {
            Ok(wakeups) => {
                let mut wakeups = wakeups.clone();
                wakeups.borrow_and_update();
                Some(wakeups)
            }
            Err(err) => {
                warn!(channel, error = %err, "cannot LISTEN for new events, polling instead");
                None
            }
        }
    }
}

async fn listen(pool: &PgPool, channel: &str) -> Result<watch::Receiver<u64>, sqlx::Error> {
    // A one-connection pool of its own: the listener holds its connection for as long as
    // the store lives, and must not take it from the application's pool.
    let options = pool.connect_options().as_ref().clone();
    let listen_pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .connect_lazy_with(options);
    let mut listener = PgListener::connect_with(&listen_pool).await?;
    listener.listen(channel).await?;
    let (wake, wakeups) = watch::channel(0);
    tokio::spawn(forward(listener, wake, channel.to_owned()));
    debug!(channel, "listening for new events");
    Ok(wakeups)
}

/// Turns notifications into wake-ups until the store (the last receiver) is dropped.
async fn forward(mut listener: PgListener, wake: watch::Sender<u64>, channel: String) {
    loop {
        tokio::select! {
            () = wake.closed() => break,
            received = listener.try_recv() => match received {
                Ok(Some(_)) => {}
                // The connection was lost and re-established: notifications sent in
                // between are gone, so wake everyone to look for themselves.
                Ok(None) => debug!(channel, "listener reconnected"),
                Err(err) => {
                    warn!(channel, error = %err, "listener failed, retrying in 1 s");
                    tokio::select! {
                        () = wake.closed() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            },
        }
        wake.send_modify(|n| *n = n.wrapping_add(1));
    }
    debug!(channel, "stopped listening");
}

/// Resolves once events after `after_position` can be read, or at `timeout`.
pub(crate) async fn wait_for_events(inner: &Inner, after_position: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    // Subscribe before asking the database: an append that commits after the check below
    // then always wakes us, so no event is missed between the check and the wait.
    let mut wakeups = if inner.notify.is_on() {
        inner.notifier.subscribe(&inner.pool, &inner.channel).await
    } else {
        None
    };
    let mut backoff = Duration::from_millis(1);
    loop {
        let peek = match inner.peek_after(after_position).await {
            Ok(Peek::Ready) => return,
            Ok(peek) => peek,
            Err(err) => {
                debug!(error = %err, "checking for new events failed");
                Peek::Nothing
            }
        };
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let woken = match wakeups.as_mut() {
            // Committed events wait for the horizon, which moves without a notification:
            // look again soon.
            _ if peek == Peek::HeldBack => {
                tokio::time::sleep(backoff.min(deadline - now)).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
                Ok(Ok(()))
            }
            Some(rx) => tokio::time::timeout_at(deadline, rx.changed()).await,
            None => {
                tokio::time::sleep(inner.poll_interval.min(deadline - now)).await;
                Ok(Ok(()))
            }
        };
        match woken {
            Ok(Ok(())) => {}
            // The listener is gone: poll for the rest of the time.
            Ok(Err(_)) => wakeups = None,
            Err(_elapsed) => return,
        }
    }
}
