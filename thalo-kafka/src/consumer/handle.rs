//! What a running consumer shows the rest of its process: whether it runs, which
//! partitions the group gave it (for readiness checks), and how far it has got.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::ConsumerStats;

/// A cloneable view of a [`KafkaConsumer`](super::KafkaConsumer)'s state while it runs:
/// whether it is running, whether it has joined its group and the partitions assigned to
/// it (for health and readiness checks), and its progress: what it did so far
/// ([`stats`](ConsumerHandle::stats)) and, per partition, where it is and how far behind
/// ([`partitions`](ConsumerHandle::partitions), [`lag`](ConsumerHandle::lag)).
///
/// For read-your-writes with a Postgres projection fed by the consumer, wait on the
/// projection's checkpoints: `thalo_postgres::PgEventStore::wait_until_projected`
/// (the consumer's offsets say what it read, the checkpoints what it applied).
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
/// // Progress, while it runs:
/// println!("handled {} events, {:?} behind", handle.stats().handled, handle.lag());
/// for p in handle.partitions() {
///     println!("{}[{}] at offset {} of {}", p.topic, p.partition, p.position, p.high_watermark);
/// }
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
    /// The counters of the current (or last) run.
    stats: Mutex<Arc<StatsCounters>>,
    /// Each assigned partition's position and high watermark, from the last statistics.
    positions: Mutex<BTreeMap<(String, i32), (i64, i64)>>,
}

/// Where a consumer is in one of its partitions, from librdkafka's statistics (refreshed
/// every `statistics.interval.ms`, 1 s by default).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionProgress {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset of the next message the consumer will hand over: every message
    /// before it was handled (or dead-lettered).
    pub position: i64,
    /// The partition's high watermark: the offset the next message produced to it gets.
    pub high_watermark: i64,
}

impl PartitionProgress {
    /// Messages between the consumer's position and the end of the partition.
    pub fn lag(&self) -> u64 {
        (self.high_watermark - self.position).max(0) as u64
    }
}

/// What a run did so far; the handle shows it live, `run` returns it at the end.
#[derive(Debug, Default)]
pub(crate) struct StatsCounters {
    pub(crate) handled: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) parked: AtomicU64,
    pub(crate) held: AtomicU64,
}

impl StatsCounters {
    pub(crate) fn snapshot(&self) -> ConsumerStats {
        ConsumerStats {
            handled: self.handled.load(Ordering::SeqCst),
            dead_lettered: self.dead_lettered.load(Ordering::SeqCst),
            retries: self.retries.load(Ordering::SeqCst),
            duplicates: self.duplicates.load(Ordering::SeqCst),
            parked: self.parked.load(Ordering::SeqCst),
            held: self.held.load(Ordering::SeqCst),
        }
    }
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

    /// What the current run has done so far (the last run's totals once it stopped):
    /// the counts `run` returns at the end.
    pub fn stats(&self) -> ConsumerStats {
        let counters = Arc::clone(
            &self
                .state
                .stats
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        counters.snapshot()
    }

    /// Where the consumer is in each partition assigned to it, in order, as of the last
    /// statistics (every second); empty before the first statistics after an
    /// assignment, and after it stopped.
    pub fn partitions(&self) -> Vec<PartitionProgress> {
        let assigned = self.assigned_partitions();
        let positions = self
            .state
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        assigned
            .into_iter()
            .filter_map(|key| {
                let (position, high_watermark) = *positions.get(&key)?;
                Some(PartitionProgress {
                    topic: key.0,
                    partition: key.1,
                    position,
                    high_watermark,
                })
            })
            .collect()
    }

    /// Messages waiting in the partitions assigned to the consumer (the sum of their
    /// [`lag`](PartitionProgress::lag)), as of the last statistics; `None` while no
    /// partition has statistics yet (not joined, nothing assigned, or just assigned).
    pub fn lag(&self) -> Option<u64> {
        let partitions = self.partitions();
        if partitions.is_empty() {
            return None;
        }
        Some(partitions.iter().map(PartitionProgress::lag).sum())
    }

    /// A run started: its counters, shown from now on.
    pub(crate) fn new_run(&self) -> Arc<StatsCounters> {
        let counters = Arc::new(StatsCounters::default());
        *self
            .state
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::clone(&counters);
        counters
    }

    /// The position and high watermark of a partition, from the statistics.
    pub(crate) fn record_position(&self, topic: &str, partition: i32, position: i64, high: i64) {
        let mut positions = self
            .state
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match positions.get_mut(&(topic.to_owned(), partition)) {
            Some(entry) => *entry = (position, high),
            None => {
                positions.insert((topic.to_owned(), partition), (position, high));
            }
        }
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
        self.state
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
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
        let mut positions = self
            .state
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for partition in partitions {
            assigned.remove(partition);
            positions.remove(partition);
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
