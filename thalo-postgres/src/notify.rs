//! Waking readers when events are appended: `LISTEN` on the store's channel, with a
//! polling fallback.
//!
//! Appends notify `<schema>_events` with their last position: by default from a
//! background task once they committed ([`Announcer`]), or with `pg_notify` in their own
//! transaction ([`NotifyMode::InTransaction`]). One listener per
//! store (on its own connection, not one of the pool's) turns notifications into a
//! counter that waiters watch. Notifications are hints, never the source of truth: a
//! waiter always asks the database whether there is something to read, and a lost
//! notification (a reconnect, a store with notify off) only costs latency, bounded by the
//! caller's timeout and the poll interval. When the database holds committed events that
//! are still behind the read horizon (an older transaction is running, see `global.rs`),
//! no notification will announce the horizon moving, so the waiter polls with a short
//! backoff instead.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::{watch, OnceCell};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::global::Peek;
use crate::sql;
use crate::store::Inner;

/// Whether and how appends `NOTIFY` the channel `<schema>_events` with their last
/// position, for the outbox relay and subscriptions that `LISTEN` on it.
///
/// Notifications are only wake-ups: listeners also poll, so a lost notification costs
/// latency, never events.
///
/// Choosing: Postgres serialises the commits of all transactions that notify (each holds
/// a database-wide lock on the notification queue from its pre-commit until its commit
/// is durable, WAL flush included), so [`InTransaction`](NotifyMode::InTransaction)
/// caps concurrent appends at roughly one commit per WAL flush.
/// [`AfterCommit`](NotifyMode::AfterCommit), the default, keeps commits concurrent
/// (Postgres' own WAL group commit works again) and costs appends little: a background
/// task sends the notification after the commit, at most one per
/// [`notify_interval`](crate::PgEventStoreBuilder::notify_interval) (5 ms by default),
/// for all the appends that committed meanwhile. A notification is lost if the process
/// dies between the commit and the `NOTIFY`; listeners then find the events at their
/// next poll. The benchmark measures all three.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotifyMode {
    /// No notifications; listeners poll.
    Off,
    /// `pg_notify` in the append's own statement and transaction: delivered exactly when
    /// the events commit, and serialises the commits of concurrent appends.
    InTransaction,
    /// `NOTIFY` from a background task of the store once the append has committed,
    /// one notification (the highest position so far) for however many appends
    /// committed meanwhile; every commit is announced, also one that commits after a
    /// higher position was. The default.
    /// [`append_in`](crate::PgEventStore::append_in) cannot know when the caller commits
    /// and notifies in the caller's transaction instead.
    #[default]
    AfterCommit,
}

impl NotifyMode {
    /// Whether appends notify at all.
    pub fn is_on(self) -> bool {
        self != NotifyMode::Off
    }
}

/// Sends the notifications of [`NotifyMode::AfterCommit`] from a background task, so
/// that no append waits for its `NOTIFY` and concurrent appends share one.
#[derive(Debug)]
pub(crate) struct Announcer {
    /// What is left to announce; the task holds the receiver.
    latest: Mutex<Option<watch::Sender<Announced>>>,
    /// The shortest time between the starts of two `NOTIFY`s.
    interval: Duration,
}

/// The commits announced so far, as the background task sees them.
///
/// Counting commits, not only remembering the highest position, is what makes a late
/// commit heard: positions are taken when rows are inserted but transactions commit in
/// any order, so an append that commits after a higher position was announced still
/// has news for listeners (its events just became visible) although its position is
/// lower.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Announced {
    /// Commits announced since the task started; moves with every commit.
    commits: u64,
    /// The highest position among them: the notification's payload.
    position: i64,
}

impl Announcer {
    pub(crate) fn new(interval: Duration) -> Self {
        Announcer {
            latest: Mutex::new(None),
            interval,
        }
    }

    /// Records a commit whose last position is `last` for the background task, spawning
    /// it on the current runtime when it is not running (first use, or its runtime has
    /// shut down since).
    pub(crate) fn announce(&self, pool: &PgPool, channel: &str, last: i64) {
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        let running = latest.as_ref().filter(|sender| !sender.is_closed());
        let sender = match running {
            Some(sender) => sender,
            None => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    debug!(
                        channel,
                        "no Tokio runtime to notify from; listeners will poll"
                    );
                    return;
                };
                let (sender, receiver) = watch::channel(Announced::default());
                runtime.spawn(announce(
                    pool.clone(),
                    channel.to_owned(),
                    receiver,
                    self.interval,
                ));
                latest.insert(sender)
            }
        };
        sender.send_modify(|announced| {
            announced.commits = announced.commits.wrapping_add(1);
            announced.position = announced.position.max(last);
        });
    }
}

/// Notifies `channel` with the highest announced position until the store (the sender)
/// is dropped. Every commit is announced, including one whose position is below that of
/// an earlier notification. Commits announced while a `NOTIFY` is on its way, or within
/// `interval` of the previous one, share the next one: an append after a quiet spell is
/// announced at once, and under a steady stream of appends there is one `NOTIFY` per
/// `interval` (each is a transaction of its own, which costs the server as much as a
/// small append).
async fn announce(
    pool: PgPool,
    channel: String,
    mut latest: watch::Receiver<Announced>,
    interval: Duration,
) {
    // The commits covered by the last `NOTIFY` that went out.
    let mut sent = 0;
    let mut sent_at: Option<Instant> = None;
    while latest.changed().await.is_ok() {
        if let Some(at) = sent_at {
            tokio::time::sleep_until(at + interval).await;
        }
        let announced = *latest.borrow_and_update();
        if announced.commits == sent {
            continue;
        }
        sent_at = Some(Instant::now());
        let notified = sqlx::query(sql::NOTIFY)
            .bind(&channel)
            .bind(announced.position.to_string())
            .execute(&pool)
            .await;
        match notified {
            Ok(_) => sent = announced.commits,
            // `sent` stays behind, so the next commit's `NOTIFY` covers these too.
            Err(err) => {
                warn!(channel, error = %err, "notifying new events failed; listeners will poll")
            }
        }
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
