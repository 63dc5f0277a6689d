//! One partition's worker: fencing, sequenced dead letters, retries.
//!
//! Each assigned partition has a worker task that handles its messages one after the
//! other. Before a message reaches the handler, the worker
//!
//! 1. drops it if it comes from a deposed relay leader (an older `thalo_epoch` than one
//!    seen for its aggregate) or repeats a sequence already seen for its aggregate (a
//!    relay duplicate), so a handler never sees an aggregate's sequence go backwards;
//! 2. holds it if its aggregate's stream is parked (sequenced dead letters: an earlier
//!    event of the aggregate was given up on), and parks the stream if the message
//!    skips a sequence (a gap);
//! 3. retries the handler with backoff; when it gives up, parks the stream and writes
//!    the message to the dead-letter topic, and goes on with the other aggregates.
//!
//! Exactly-once projections keep their parking in Postgres, next to their checkpoints
//! (see `thalo_postgres::PgEventStore::redrive_projection`): the worker leaves holding
//! and gap detection to the store there.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;
use thalo::{Error, Event, EventEnvelope, RawEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn, Instrument as _};

use super::dead_letter::DeadLetterReason;
use super::{is_outage, Apply, Counts, Shared};
use crate::backoff::sleep_or_cancel;
use crate::message::{decode_raw_message, error_chain, header};
use crate::trace;

/// Whether the message was dealt with (its offset may be stored) or the worker was
/// stopped first (it will be delivered again).
pub(crate) enum Outcome {
    Done,
    Interrupted,
}

/// What the handler did with one message.
enum Processed {
    Done(Counts),
    GaveUp { error: Error, attempts: u32 },
    Interrupted,
}

/// The most aggregates a worker remembers for fencing; past it, it starts afresh
/// (relay duplicates of forgotten aggregates then reach the handler, as they would
/// after a restart).
const FENCE_CAPACITY: usize = 100_000;

/// What a worker knows of its partition's aggregates.
#[derive(Default)]
struct PartitionState {
    /// Per aggregate (type, id): the newest epoch and the last sequence seen.
    seen: HashMap<(String, String), (u64, u64)>,
    /// Streams parked by this worker or found parked, for handlers whose parking is
    /// not in a store's checkpoints: the first sequence not applied, and whether the
    /// park is durable (in Postgres, where an operator may release it).
    parked: HashMap<(String, String), (u64, bool)>,
}

/// The fencing verdict on a message.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    Fresh,
    /// The sequence skips one: `expected` is missing.
    Gap {
        expected: u64,
    },
    /// From an older relay epoch than one already seen for the aggregate.
    Stale,
    /// A sequence already seen.
    Duplicate,
}

impl PartitionState {
    fn admit(&mut self, raw: &EventEnvelope<RawEvent>, epoch: Option<u64>) -> Admit {
        if self.seen.len() >= FENCE_CAPACITY {
            self.seen.clear();
        }
        let key = (raw.aggregate_type.clone(), raw.aggregate_id.clone());
        let (admit, next) = verdict(self.seen.get(&key).copied(), raw.sequence, epoch);
        if let Some(next) = next {
            self.seen.insert(key, next);
        }
        admit
    }
}

/// The fencing verdict on a message of an aggregate last seen at `seen` (epoch,
/// sequence), and what to remember of the aggregate when the message is admitted.
fn verdict(
    seen: Option<(u64, u64)>,
    sequence: u64,
    epoch: Option<u64>,
) -> (Admit, Option<(u64, u64)>) {
    let Some((seen_epoch, seen_sequence)) = seen else {
        return (Admit::Fresh, Some((epoch.unwrap_or(0), sequence)));
    };
    let epoch = epoch.unwrap_or(seen_epoch);
    if epoch < seen_epoch {
        return (Admit::Stale, None);
    }
    if sequence <= seen_sequence {
        return (Admit::Duplicate, None);
    }
    let expected = seen_sequence + 1;
    let admit = if sequence > expected {
        Admit::Gap { expected }
    } else {
        Admit::Fresh
    };
    (admit, Some((epoch, sequence)))
}

/// The relay epoch in a message's headers.
fn epoch_of(message: &OwnedMessage) -> Option<u64> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == header::EPOCH)
        .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
}

/// Handles one partition's messages in order. `turn` makes a worker for a partition
/// that was revoked and assigned again wait until the previous worker has finished its
/// message in hand, so one partition never has two messages in progress at once.
pub(crate) async fn partition_worker<E: Event, A: Apply<E>>(
    shared: Arc<Shared<E, A>>,
    turn: Arc<tokio::sync::Mutex<()>>,
    token: CancellationToken,
    mut rx: mpsc::Receiver<OwnedMessage>,
) {
    let _turn = turn.lock_owned().await;
    let mut state = PartitionState::default();
    let mut batch: Vec<OwnedMessage> = Vec::new();
    loop {
        let message = tokio::select! {
            biased;
            () = token.cancelled() => break,
            message = rx.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let consume = trace::consume_span(&message);
        batch.clear();
        batch.push(message);
        if A::BATCHES {
            // Take what is already queued, without waiting for more: batching adds no
            // latency, it only catches up faster when the partition is behind.
            while batch.len() < shared.config.max_batch {
                match rx.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(_) => break,
                }
            }
            consume.record("messages", batch.len() as u64);
            trace::link_messages(&consume, &batch);
            if batch.len() > 1
                && shared
                    .process_batch(&mut state, &batch)
                    .instrument(consume.clone())
                    .await
            {
                if let Some(last) = batch.last() {
                    shared.store_offset(last);
                }
                continue;
            }
        }
        // One at a time: the batch had an undecodable message or a failing event, which
        // must be found, retried and maybe parked on its own. Events of the batch that
        // were applied already are skipped by the projection's checkpoint.
        for message in &batch {
            if token.is_cancelled() {
                return;
            }
            match shared
                .handle_one(&mut state, message, &token)
                .instrument(trace::handle_span(&consume, message))
                .await
            {
                // The guarantee: the offset is stored only now, after the handler
                // succeeded, or the message was held or dead-lettered (and recorded).
                Outcome::Done => shared.store_offset(message),
                Outcome::Interrupted => return,
            }
        }
    }
}

impl<E: Event, A: Apply<E>> Shared<E, A> {
    /// Stores the offset after `message`. Fails when the partition was revoked
    /// meanwhile; its next owner gets the message again.
    fn store_offset(&self, message: &OwnedMessage) {
        if let Err(err) =
            self.consumer
                .store_offset(message.topic(), message.partition(), message.offset())
        {
            debug!(topic = message.topic(), partition = message.partition(), error = %err, "offset not stored (partition revoked)");
        }
    }

    /// Applies a batch in one go (exactly-once projections, which do their own holding
    /// and gap detection). `false` when any message cannot be decoded or the batch
    /// fails; the caller then goes one message at a time (the fencing state is only
    /// changed when the batch succeeds).
    async fn process_batch(&self, state: &mut PartitionState, batch: &[OwnedMessage]) -> bool {
        let Ok(raws) = batch
            .iter()
            .map(decode_raw_message)
            .collect::<Result<Vec<_>, _>>()
        else {
            return false;
        };
        // Fencing against the partition's state plus what this batch changes: the state
        // itself only changes when the batch succeeds.
        let mut changes: HashMap<(String, String), (u64, u64)> = HashMap::new();
        let mut envelopes = Vec::with_capacity(raws.len());
        let mut dropped = 0;
        for (raw, message) in raws.into_iter().zip(batch) {
            let key = (raw.aggregate_type.clone(), raw.aggregate_id.clone());
            let seen = changes.get(&key).or_else(|| state.seen.get(&key)).copied();
            let (admit, next) = verdict(seen, raw.sequence, epoch_of(message));
            if let Some(next) = next {
                changes.insert(key, next);
            }
            match admit {
                Admit::Stale | Admit::Duplicate => dropped += 1,
                Admit::Fresh | Admit::Gap { .. } => match raw.decode::<E>() {
                    Ok(envelope) => envelopes.push(envelope),
                    Err(_) => return false,
                },
            }
        }
        let started = Instant::now();
        let result = AssertUnwindSafe(self.apply.apply_batch(&envelopes))
            .catch_unwind()
            .await;
        self.metrics.handled_in(started.elapsed());
        match result {
            Ok(Ok(counts)) => {
                if state.seen.len() + changes.len() > FENCE_CAPACITY {
                    state.seen.clear();
                }
                state.seen.extend(changes);
                let applied = envelopes.len() as u64 - counts.duplicates - counts.held;
                self.stats.handled.fetch_add(applied, Ordering::Relaxed);
                self.stats
                    .duplicates
                    .fetch_add(counts.duplicates + dropped, Ordering::Relaxed);
                self.stats.held.fetch_add(counts.held, Ordering::Relaxed);
                self.metrics.applied.increment(applied);
                self.metrics
                    .duplicate
                    .increment(counts.duplicates + dropped);
                self.metrics.parked.increment(counts.held);
                true
            }
            Ok(Err(err)) => {
                debug!(group = self.config.group_id, error = %error_chain(&err), "batch failed; handling its messages one by one");
                false
            }
            Err(_panic) => false,
        }
    }

    /// Fences, holds, parks or handles one message.
    async fn handle_one(
        &self,
        state: &mut PartitionState,
        message: &OwnedMessage,
        token: &CancellationToken,
    ) -> Outcome {
        let raw = match decode_raw_message(message) {
            Ok(raw) => raw,
            Err(err) => {
                // Not even the headers: no aggregate to park. The record is all there is.
                error!(
                    group = self.config.group_id,
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    error = %error_chain(&err),
                    "cannot decode message; sending it to the dead-letter topic"
                );
                let outcome = self
                    .dead_letter(
                        message,
                        &error_chain(&err),
                        DeadLetterReason::Decode,
                        0,
                        token,
                    )
                    .await;
                if let Outcome::Done = outcome {
                    self.metrics.dead_lettered.increment(1);
                }
                return outcome;
            }
        };
        let stream = (raw.aggregate_type.clone(), raw.aggregate_id.clone());
        match state.admit(&raw, epoch_of(message)) {
            Admit::Stale => {
                warn!(
                    group = self.config.group_id,
                    aggregate_type = raw.aggregate_type,
                    aggregate_id = raw.aggregate_id,
                    sequence = raw.sequence,
                    epoch = epoch_of(message),
                    "dropped a message from a deposed relay leader"
                );
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                self.metrics.duplicate.increment(1);
                return Outcome::Done;
            }
            Admit::Duplicate => {
                debug!(
                    group = self.config.group_id,
                    aggregate_id = raw.aggregate_id,
                    sequence = raw.sequence,
                    "dropped a duplicate"
                );
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                self.metrics.duplicate.increment(1);
                return Outcome::Done;
            }
            Admit::Gap { expected } if !A::PARKS_IN_STORE => {
                if !state.parked.contains_key(&stream) {
                    let error = format!(
                        "event {expected} of {} `{}` never arrived: event {} did first",
                        raw.aggregate_type, raw.aggregate_id, raw.sequence
                    );
                    return self
                        .park(
                            state,
                            message,
                            &raw,
                            expected,
                            &error,
                            DeadLetterReason::Gap,
                            0,
                            token,
                        )
                        .await;
                }
            }
            Admit::Gap { .. } | Admit::Fresh => {}
        }

        if !A::PARKS_IN_STORE {
            if let Some(&(first, durable)) = state.parked.get(&stream) {
                let still = if durable {
                    // An operator may have re-driven it meanwhile.
                    match self
                        .apply
                        .still_parked(&self.config.group_id, &stream)
                        .await
                    {
                        Ok(still) => still,
                        Err(err) => {
                            warn!(error = %error_chain(&err), "cannot check a parked stream; holding the event");
                            true
                        }
                    }
                } else {
                    true
                };
                if still {
                    self.stats.held.fetch_add(1, Ordering::Relaxed);
                    self.metrics.parked.increment(1);
                    let error = format!(
                        "held: event {first} of {} `{}` is parked",
                        raw.aggregate_type, raw.aggregate_id
                    );
                    return self
                        .dead_letter(message, &error, DeadLetterReason::Held, 0, token)
                        .await;
                }
                state.parked.remove(&stream);
            }
        }

        let envelope = match raw.decode::<E>() {
            Ok(envelope) => envelope,
            Err(err) => {
                let error = error_chain(&err);
                error!(
                    group = self.config.group_id,
                    aggregate_type = raw.aggregate_type,
                    aggregate_id = raw.aggregate_id,
                    sequence = raw.sequence,
                    error,
                    "cannot decode the event; parking its stream"
                );
                return self
                    .park(
                        state,
                        message,
                        &raw,
                        raw.sequence,
                        &error,
                        DeadLetterReason::Decode,
                        0,
                        token,
                    )
                    .await;
            }
        };
        match self.process(message, &envelope, token).await {
            Processed::Done(counts) => {
                if counts.duplicates > 0 {
                    self.stats
                        .duplicates
                        .fetch_add(counts.duplicates, Ordering::Relaxed);
                    self.metrics.duplicate.increment(counts.duplicates);
                } else if counts.held > 0 {
                    self.stats.held.fetch_add(counts.held, Ordering::Relaxed);
                    self.metrics.parked.increment(counts.held);
                } else {
                    self.stats.handled.fetch_add(1, Ordering::Relaxed);
                    self.metrics.applied.increment(1);
                }
                Outcome::Done
            }
            Processed::Interrupted => Outcome::Interrupted,
            Processed::GaveUp { error, attempts } => {
                let error = error_chain(&error);
                self.park(
                    state,
                    message,
                    &raw,
                    raw.sequence,
                    &error,
                    DeadLetterReason::Handler,
                    attempts,
                    token,
                )
                .await
            }
        }
    }

    /// Parks `raw`'s stream at `sequence` (durably when the consumer has a store),
    /// then writes the message to the dead-letter topic as the record.
    #[allow(clippy::too_many_arguments)]
    async fn park(
        &self,
        state: &mut PartitionState,
        message: &OwnedMessage,
        raw: &EventEnvelope<RawEvent>,
        sequence: u64,
        error: &str,
        reason: DeadLetterReason,
        attempts: u32,
        token: &CancellationToken,
    ) -> Outcome {
        let mut failures = 0;
        let durable = loop {
            match self
                .apply
                .park(&self.config.group_id, raw, sequence, error)
                .await
            {
                Ok(durable) => break durable,
                Err(err) => {
                    // Parking must not be lost: the offset may not move past the message
                    // until it is recorded.
                    failures += 1;
                    let delay = self.config.retry.backoff(failures);
                    warn!(error = %error_chain(&err), retry_in_ms = delay.as_millis() as u64, "cannot park a stream; retrying");
                    if !sleep_or_cancel(delay, token).await {
                        return Outcome::Interrupted;
                    }
                }
            }
        };
        self.stats.parked.fetch_add(1, Ordering::Relaxed);
        self.metrics.parked.increment(1);
        if !A::PARKS_IN_STORE {
            state.parked.insert(
                (raw.aggregate_type.clone(), raw.aggregate_id.clone()),
                (sequence, durable),
            );
        }
        warn!(
            group = self.config.group_id,
            aggregate_type = raw.aggregate_type,
            aggregate_id = raw.aggregate_id,
            sequence,
            durable,
            reason = reason.as_str(),
            error,
            "stream parked: its later events are held behind it; other aggregates go on"
        );
        self.dead_letter(message, error, reason, attempts, token)
            .await
    }

    /// Runs the handler on one event, retrying failures: outages until they end,
    /// other failures up to the retry policy's attempts.
    async fn process(
        &self,
        message: &OwnedMessage,
        envelope: &EventEnvelope<E>,
        token: &CancellationToken,
    ) -> Processed {
        let mut attempts = 0;
        let mut outages = 0;
        loop {
            let started = Instant::now();
            let result = AssertUnwindSafe(self.apply.apply(envelope))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| {
                    let text = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".to_owned());
                    Err(Error::handler(
                        self.config.group_id.clone(),
                        format!("handler panicked: {text}"),
                    ))
                });
            self.metrics.handled_in(started.elapsed());
            let err = match result {
                Ok(counts) => return Processed::Done(counts),
                Err(err) => err,
            };
            self.metrics.failed.increment(1);
            let delay = if is_outage(&err) {
                outages += 1;
                let delay = self.config.retry.backoff(outages);
                warn!(
                    group = self.config.group_id,
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    aggregate_id = envelope.aggregate_id,
                    sequence = envelope.sequence,
                    error = %error_chain(&err),
                    retry_in_ms = delay.as_millis() as u64,
                    "infrastructure error; retrying until it recovers"
                );
                delay
            } else {
                outages = 0;
                attempts += 1;
                if attempts >= self.config.retry.max_attempts {
                    error!(
                        group = self.config.group_id,
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        aggregate_id = envelope.aggregate_id,
                        sequence = envelope.sequence,
                        attempts,
                        error = %error_chain(&err),
                        "handler keeps failing; parking the stream"
                    );
                    return Processed::GaveUp {
                        error: err,
                        attempts,
                    };
                }
                let delay = self.config.retry.backoff(attempts);
                warn!(
                    group = self.config.group_id,
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    aggregate_id = envelope.aggregate_id,
                    sequence = envelope.sequence,
                    attempt = attempts,
                    error = %error_chain(&err),
                    retry_in_ms = delay.as_millis() as u64,
                    "handler failed; retrying"
                );
                delay
            };
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            if !sleep_or_cancel(delay, token).await {
                return Processed::Interrupted;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(id: &str, sequence: u64) -> EventEnvelope<RawEvent> {
        EventEnvelope {
            id: uuid::Uuid::new_v4(),
            aggregate_type: "account".into(),
            aggregate_id: id.into(),
            sequence,
            position: sequence,
            timestamp: chrono::Utc::now(),
            metadata: thalo::Metadata::default(),
            event: RawEvent {
                event_type: "Deposited".into(),
                version: 1,
                payload: "{}".into(),
            },
        }
    }

    #[test]
    fn fencing_drops_stale_epochs_and_repeated_sequences() {
        let mut state = PartitionState::default();
        // A deposed leader (epoch 1) and its successor (epoch 2) both publish A5..A7.
        assert_eq!(state.admit(&raw("a", 5), Some(2)), Admit::Fresh);
        assert_eq!(state.admit(&raw("a", 6), Some(2)), Admit::Fresh);
        assert_eq!(state.admit(&raw("a", 5), Some(1)), Admit::Stale);
        assert_eq!(state.admit(&raw("a", 7), Some(1)), Admit::Stale);
        assert_eq!(state.admit(&raw("a", 6), Some(2)), Admit::Duplicate);
        assert_eq!(state.admit(&raw("a", 7), Some(2)), Admit::Fresh);
        // Other aggregates are independent.
        assert_eq!(state.admit(&raw("b", 1), Some(1)), Admit::Fresh);
        // A new leader republishing after a crash: a newer epoch, old sequences.
        assert_eq!(state.admit(&raw("a", 7), Some(3)), Admit::Duplicate);
        assert_eq!(state.admit(&raw("a", 8), Some(3)), Admit::Fresh);
    }

    #[test]
    fn fencing_reports_gaps() {
        let mut state = PartitionState::default();
        assert_eq!(state.admit(&raw("a", 1), None), Admit::Fresh);
        assert_eq!(state.admit(&raw("a", 3), None), Admit::Gap { expected: 2 });
        assert_eq!(state.admit(&raw("a", 4), None), Admit::Fresh);
    }
}
