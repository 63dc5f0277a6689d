//! Group membership callbacks: stopping the workers of revoked partitions and committing
//! what they handled, so the next owner starts where this one stopped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use metrics::SharedString;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::handle::ConsumerHandle;
use super::instruments::record_lag;

/// Consumer callbacks: tracks which partitions have a worker, so a revocation can stop
/// them, and commits on revocation.
pub(crate) struct GroupContext {
    pub(crate) group_id: String,
    pub(crate) partitions: Mutex<HashMap<(String, i32), CancellationToken>>,
    pub(crate) commit_on_revoke: AtomicBool,
    /// Each partition's high watermark, from librdkafka's statistics (no extra
    /// requests): how the consumer tells a quiet partition from a stalled one.
    high_watermarks: Mutex<HashMap<(String, i32), i64>>,
    /// The assignment, as the consumer's [`ConsumerHandle`] shows it.
    handle: ConsumerHandle,
    /// The `consumer` label of `thalo_consumer_lag` (the group id).
    label: SharedString,
}

impl GroupContext {
    pub(crate) fn new(group_id: String, handle: ConsumerHandle) -> Self {
        GroupContext {
            label: SharedString::from(group_id.clone()),
            group_id,
            partitions: Mutex::default(),
            commit_on_revoke: AtomicBool::new(true),
            high_watermarks: Mutex::default(),
            handle,
        }
    }

    /// The last known high watermark of a partition.
    pub(crate) fn high_watermark(&self, key: &(String, i32)) -> Option<i64> {
        self.high_watermarks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
    }

    pub(crate) fn lock_partitions(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, i32), CancellationToken>> {
        self.partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl ClientContext for GroupContext {
    /// Every `statistics.interval.ms` (1 s): the high watermarks, and
    /// `thalo_consumer_lag` of the partitions assigned to this consumer, from what the
    /// statistics say already (no requests to the broker).
    fn stats(&self, statistics: Statistics) {
        let mut high = self
            .high_watermarks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (topic, stats) in statistics.topics {
            for (partition, stats) in stats.partitions {
                if partition < 0 || stats.hi_offset < 0 {
                    continue;
                }
                high.insert((topic.clone(), partition), stats.hi_offset);
                // The position: the offset after the last handled message (stored), or
                // the group's committed offset before this consumer handled any, or
                // where the fetcher starts in a partition the group never committed.
                let position = [
                    stats.stored_offset,
                    stats.committed_offset,
                    stats.next_offset,
                ]
                .into_iter()
                .find(|offset| *offset >= 0);
                if let Some(position) = position {
                    if self.handle.is_assigned(&topic, partition) {
                        record_lag(&self.label, &topic, partition, stats.hi_offset - position);
                        self.handle
                            .record_position(&topic, partition, position, stats.hi_offset);
                    }
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let revoked: Vec<(String, i32)> = list
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                info!(group = self.group_id, partitions = ?revoked, "partitions revoked");
                self.handle.revoke(&revoked);
                {
                    // Workers of revoked partitions drop their queued messages and stop
                    // after the message in hand.
                    let mut partitions = self.lock_partitions();
                    for key in &revoked {
                        if let Some(token) = partitions.remove(key) {
                            token.cancel();
                        }
                    }
                }
                // Commit what was handled, so the next owner does not redo it. (The
                // message in hand is not stored yet: its next owner handles it again.)
                if self.commit_on_revoke.load(Ordering::SeqCst) {
                    match consumer.commit_consumer_state(CommitMode::Sync) {
                        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                        Err(err) => {
                            warn!(group = self.group_id, error = %err, "commit on revocation failed")
                        }
                    }
                }
            }
            Rebalance::Assign(list) => {
                let assigned: Vec<(String, i32)> = list
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                info!(group = self.group_id, partitions = ?assigned, "partitions assigned");
                self.handle.assign(&assigned);
            }
            Rebalance::Error(err) => warn!(group = self.group_id, error = %err, "rebalance error"),
        }
    }
}

/// Disarms the commit-on-revoke when `run` is dropped before its graceful shutdown.
pub(crate) struct AbandonGuard {
    pub(crate) consumer: Option<Arc<StreamConsumer<GroupContext>>>,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            consumer
                .context()
                .commit_on_revoke
                .store(false, Ordering::SeqCst);
        }
    }
}
