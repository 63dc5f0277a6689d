//! What a running consumer shows the rest of its process: whether it runs, and which
//! partitions the group gave it (for readiness checks).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// A cloneable view of a [`KafkaConsumer`](super::KafkaConsumer)'s state, for health and
/// readiness checks: whether it is running, whether it has joined its group, and the
/// partitions assigned to it.
///
/// Take it with [`KafkaConsumer::handle`](super::KafkaConsumer::handle) before calling
/// `run` (which consumes the consumer); it follows every run of that consumer and of
/// its clones. Reading it takes no lock that the consumer holds for long and makes no
/// request to the broker.
///
/// ```no_run
/// # async fn example() -> Result<(), thalo::Error> {
/// # #[derive(Clone, Debug)] struct Changed;
/// # impl thalo::Event for Changed {
/// #     fn event_type(&self) -> &'static str { "X" }
/// #     fn encode(&self) -> Result<String, thalo::Error> { Ok("{}".into()) }
/// #     fn decode(_: &str, _: u16, _: &str) -> Result<Self, thalo::Error> { Ok(Changed) }
/// #     fn event_types() -> &'static [&'static str] { &["X"] }
/// # }
/// # struct Mailer;
/// # impl thalo::EventHandler<Changed> for Mailer {
/// #     async fn handle(&self, _: &thalo::EventEnvelope<Changed>) -> Result<(), thalo::Error> { Ok(()) }
/// # }
/// use thalo_kafka::KafkaConsumer;
///
/// let consumer = KafkaConsumer::new("127.0.0.1:9092", "mailer").with_topic("bank_account");
/// let handle = consumer.handle();
/// let shutdown = thalo::Shutdown::on_signal();
/// tokio::spawn(consumer.run(Mailer, shutdown));
/// // In a readiness probe:
/// let ready = handle.is_running() && handle.has_joined();
/// println!("ready: {ready}, partitions: {:?}", handle.assigned_partitions());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct ConsumerHandle {
    state: Arc<HandleState>,
}

#[derive(Debug, Default)]
struct HandleState {
    running: AtomicBool,
    joined: AtomicBool,
    assigned: Mutex<BTreeSet<(String, i32)>>,
}

impl ConsumerHandle {
    /// Whether the consumer is running: from the moment it subscribed to its topics
    /// until it has stopped (shutdown, an error, or its task was dropped).
    pub fn is_running(&self) -> bool {
        self.state.running.load(Ordering::SeqCst)
    }

    /// Whether the running consumer has joined its group: it received an assignment
    /// (possibly empty, when the group has more members than partitions) since it
    /// started.
    pub fn has_joined(&self) -> bool {
        self.state.joined.load(Ordering::SeqCst)
    }

    /// The partitions (topic, partition) assigned to the consumer now, in order; empty
    /// before it joined its group and after it stopped.
    pub fn assigned_partitions(&self) -> Vec<(String, i32)> {
        self.lock().iter().cloned().collect()
    }

    /// Whether `(topic, partition)` is assigned to the consumer now.
    pub(crate) fn is_assigned(&self, topic: &str, partition: i32) -> bool {
        // BTreeSet<(String, i32)> cannot be probed with a borrowed tuple; the set is
        // small (the consumer's partitions), so a scan is fine once per statistics tick.
        self.lock()
            .iter()
            .any(|(t, p)| *p == partition && t == topic)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<(String, i32)>> {
        // One set operation per critical section: a poisoned lock holds a valid set.
        self.state
            .assigned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The consumer started (subscribed); nothing is assigned yet.
    pub(crate) fn started(&self) {
        self.lock().clear();
        self.state.joined.store(false, Ordering::SeqCst);
        self.state.running.store(true, Ordering::SeqCst);
    }

    /// The consumer stopped: nothing is assigned any more.
    pub(crate) fn stopped(&self) {
        self.state.running.store(false, Ordering::SeqCst);
        self.state.joined.store(false, Ordering::SeqCst);
        self.lock().clear();
    }

    /// Partitions were assigned (all of them with the eager protocol, the new ones with
    /// the cooperative one).
    pub(crate) fn assign(&self, partitions: &[(String, i32)]) {
        self.lock().extend(partitions.iter().cloned());
        self.state.joined.store(true, Ordering::SeqCst);
    }

    /// Partitions were revoked.
    pub(crate) fn revoke(&self, partitions: &[(String, i32)]) {
        let mut assigned = self.lock();
        for partition in partitions {
            assigned.remove(partition);
        }
    }
}

/// Marks the consumer stopped when `run` ends, however it ends (also when its future is
/// dropped).
pub(crate) struct RunningGuard(pub(crate) ConsumerHandle);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.stopped();
    }
}
