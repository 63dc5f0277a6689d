//! Group commit: appends from many tasks coalesced into one statement and one commit.
//!
//! The guarantee, and where each part of it is kept:
//!
//! - **Nothing is acknowledged before it is durable.** A batch is one statement, which
//!   commits on its own (an implicit transaction: no `BEGIN`/`COMMIT` round trips); the
//!   committer replies to the callers of a batch only after the statement returned, that
//!   is after its commit. A batch of one request is written with the plain append
//!   statement.
//! - **One bad append fails alone.** When the server rejects the batch statement with an
//!   error (say one payload holds `\u0000`, which `jsonb` refuses), the statement rolled
//!   back and stored nothing, so every request is appended on its own and each caller
//!   gets its own result: the bad one its error, the others their envelopes.
//! - **An unknown outcome is never guessed.** When the outcome is unknown (the connection
//!   was lost, or the session ended with a `FATAL` error, while the statement may have
//!   committed), every caller of the batch gets the error. Retrying those requests
//!   one by one could answer a conflict for events that are in fact stored, and a
//!   caller that then decides again would append twice.
//! - **Per-aggregate optimistic concurrency.** A batch holds at most one request per
//!   stream (later ones wait for the next batch), and the statement checks each request's
//!   head against its expected version on its own: a stale request inserts nothing and
//!   gets its own [`Error::Conflict`], the others of the batch are stored.
//! - **Racing writers outside the batch** (another process, or
//!   [`append_in`](crate::PgEventStore::append_in)) make the statement fail on the
//!   `events_stream_sequence` unique constraint; the statement then stores nothing and
//!   every request is appended on its own, so each caller gets its own result.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use futures_util::stream::{FuturesUnordered, StreamExt};
use sqlx::postgres::{PgDatabaseError, PgSeverity};
use sqlx::Row;
use thalo::{Aggregate, Error, EventEnvelope, Metadata};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;
use uuid::Uuid;

use crate::append::AppendBatch;
use crate::error::is_stream_conflict;
use crate::store::Inner;
use crate::NotifyMode;

/// Group-commit settings for [`PgEventStoreBuilder::group_commit`].
///
/// ```
/// use std::time::Duration;
/// use thalo_postgres::GroupCommit;
///
/// let config = GroupCommit::default()
///     .with_max_batch(256)
///     .with_max_wait(Duration::from_micros(500));
/// assert_eq!(config.batch_limit(), 256);
/// ```
///
/// [`PgEventStoreBuilder::group_commit`]: crate::PgEventStoreBuilder::group_commit
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    max_batch: usize,
    max_wait: Duration,
    max_in_flight: usize,
}

impl Default for GroupCommit {
    /// Batches of up to 512 appends, no waiting (a batch takes what is queued), up to 4
    /// batches being written at once.
    fn default() -> Self {
        GroupCommit {
            max_batch: 512,
            max_wait: Duration::ZERO,
            max_in_flight: 4,
        }
    }
}

impl GroupCommit {
    /// At most `n` appends per batch (default 512; clamped to 1..=65536).
    #[must_use]
    pub fn with_max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.clamp(1, 65_536);
        self
    }

    /// How long the committer waits for more appends after the first of a batch
    /// (default zero: it takes what is queued and writes at once). Appends arriving while
    /// a batch is being written queue for the next one anyway, so under load batches
    /// fill without waiting; a wait only helps when clients are few and bursty, and adds
    /// to every append's latency.
    #[must_use]
    pub fn with_max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// How many batches may be written at once, each on its own pooled connection
    /// (default 4; clamped to 1..=64). While one batch waits for its commit to be
    /// durable, the next is already being written; batches in flight never share a
    /// stream.
    #[must_use]
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.clamp(1, 64);
        self
    }

    /// The configured number of batches written at once.
    pub fn in_flight_limit(&self) -> usize {
        self.max_in_flight
    }

    /// The configured maximum batch size.
    pub fn batch_limit(&self) -> usize {
        self.max_batch
    }

    /// The configured wait for more appends.
    pub fn wait(&self) -> Duration {
        self.max_wait
    }
}

/// The store's group-commit state: the configuration and, once the first append ran, the
/// queue of the committer task.
#[derive(Debug)]
pub(crate) struct GroupState {
    pub(crate) config: GroupCommit,
    queue: OnceLock<mpsc::UnboundedSender<AppendRequest>>,
}

impl GroupState {
    pub(crate) fn new(config: GroupCommit) -> Self {
        GroupState {
            config,
            queue: OnceLock::new(),
        }
    }

    /// The committer's queue, spawning the committer on first use. It holds only a weak
    /// reference to the store, so it ends when the last store handle is dropped (its
    /// queue's sender goes with the store).
    fn queue(&self, inner: &Arc<Inner>) -> Result<&mpsc::UnboundedSender<AppendRequest>, Error> {
        if let Some(queue) = self.queue.get() {
            return Ok(queue);
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| Error::store("starting the group committer", e))?;
        let (sender, receiver) = mpsc::unbounded_channel();
        // Two first appends may race here: the loser's committer sees its queue closed
        // at once and ends.
        if self.queue.set(sender).is_ok() {
            runtime.spawn(run(Arc::downgrade(inner), receiver, self.config));
        }
        self.queue
            .get()
            .ok_or_else(|| Error::store("starting the group committer", "no queue"))
    }
}

/// One caller's append, encoded, waiting for its batch.
pub(crate) struct AppendRequest {
    batch: Arc<AppendBatch>,
    /// The new positions by sequence, or this request's own error.
    reply: oneshot::Sender<Result<Vec<i64>, Error>>,
}

impl AppendRequest {
    fn stream(&self) -> Stream {
        (self.batch.aggregate_type, self.batch.aggregate_id.clone())
    }
}

/// [`EventStore::append`](thalo::EventStore::append) through the committer.
#[tracing::instrument(
    level = "debug",
    name = "append",
    skip_all,
    fields(
        aggregate_type = A::TYPE,
        aggregate_id = %id,
        expected_version = expected_version,
        events = events.len(),
    )
)]
pub(crate) async fn append<A: Aggregate>(
    inner: &Arc<Inner>,
    group: &GroupState,
    id: &A::Id,
    expected_version: u64,
    events: Vec<A::Event>,
    metadata: &Metadata,
) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    // Encoding happens here, in the caller's task: the committer only writes.
    let batch = Arc::new(AppendBatch::new::<A>(
        id,
        expected_version,
        &events,
        metadata,
    )?);
    batch.check_size(inner.max_event_bytes)?;
    let (reply, answer) = oneshot::channel();
    group
        .queue(inner)?
        .send(AppendRequest {
            batch: Arc::clone(&batch),
            reply,
        })
        .map_err(|_| Error::store("queueing a group-commit append", "the committer is gone"))?;
    let positions = answer.await.map_err(|_| {
        Error::store("waiting for a group-commit append", "the committer is gone")
    })??;
    batch.envelopes::<A>(events, positions)
}

/// A stream, as the committer keeps them apart.
type Stream = (&'static str, String);

/// The committer: takes batches off the queue and writes each in one transaction, up to
/// `max_in_flight` batches at once.
async fn run(
    inner: Weak<Inner>,
    mut queue: mpsc::UnboundedReceiver<AppendRequest>,
    config: GroupCommit,
) {
    // Requests that met their stream already in a batch, oldest first.
    let mut deferred: VecDeque<AppendRequest> = VecDeque::new();
    // Streams of the batches being written, and those batches.
    let mut busy: HashSet<Stream> = HashSet::new();
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        if (open || !deferred.is_empty()) && in_flight.len() < config.max_in_flight {
            if open && deferred.is_empty() && in_flight.is_empty() {
                match queue.recv().await {
                    Some(request) => deferred.push_back(request),
                    None => return,
                }
            }
            let batch = next_batch(&mut queue, &mut deferred, &busy, config).await;
            if !batch.is_empty() {
                let Some(inner) = inner.upgrade() else {
                    // The store is gone; so are its callers.
                    return;
                };
                let streams: Vec<Stream> = batch.iter().map(|r| r.stream()).collect();
                busy.extend(streams.iter().cloned());
                in_flight.push(async move {
                    inner.commit_batch(batch).await;
                    streams
                });
                continue;
            }
        }
        if in_flight.is_empty() && !open && deferred.is_empty() {
            return;
        }
        tokio::select! {
            Some(streams) = in_flight.next(), if !in_flight.is_empty() => {
                for stream in streams {
                    busy.remove(&stream);
                }
            }
            received = queue.recv(), if open && in_flight.len() < config.max_in_flight => {
                match received {
                    Some(request) => deferred.push_back(request),
                    // No new appends can come; finish what was admitted.
                    None => open = false,
                }
            }
        }
    }
}

/// Admits deferred requests first, then queued ones, at most one per stream, none for a
/// stream in `busy` (being written by another batch), and `max_batch` in all; the rest is
/// deferred in arrival order.
async fn next_batch(
    queue: &mut mpsc::UnboundedReceiver<AppendRequest>,
    deferred: &mut VecDeque<AppendRequest>,
    busy: &HashSet<Stream>,
    config: GroupCommit,
) -> Vec<AppendRequest> {
    let mut batch = Vec::new();
    let mut streams: HashSet<Stream> = HashSet::new();
    let mut later = VecDeque::new();
    let mut admit = |request: AppendRequest,
                     batch: &mut Vec<AppendRequest>,
                     later: &mut VecDeque<AppendRequest>| {
        let stream = request.stream();
        if batch.len() < config.max_batch && !busy.contains(&stream) && streams.insert(stream) {
            batch.push(request);
        } else {
            later.push_back(request);
        }
    };
    for request in deferred.drain(..) {
        admit(request, &mut batch, &mut later);
    }
    let deadline = Instant::now() + config.max_wait;
    // Bounded, so that a flood of requests for streams already in the batch cannot keep
    // the committer from writing it.
    let mut received = 0;
    while batch.len() < config.max_batch && received < config.max_batch {
        let request = match queue.try_recv() {
            Ok(request) => request,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                if config.max_wait.is_zero() || batch.is_empty() {
                    break;
                }
                match tokio::time::timeout_at(deadline, queue.recv()).await {
                    Ok(Some(request)) => request,
                    Ok(None) | Err(_) => break,
                }
            }
        };
        received += 1;
        admit(request, &mut batch, &mut later);
    }
    *deferred = later;
    batch
}

/// Why a batch statement did not produce per-request results.
enum BatchFailure {
    /// A writer outside the batch won a race on one of its streams.
    Raced,
    /// The server rejected the statement (for one request's sake, or for all of them),
    /// which rolled back: nothing of the batch is stored.
    Rejected(sqlx::Error),
    /// The outcome is unknown (the batch may have committed): every caller of the batch
    /// gets the error.
    Failed(Arc<sqlx::Error>, &'static str),
}

/// Whether `err` proves that the statement that failed with it stored nothing.
///
/// An error the server reports at `ERROR` severity aborts the statement's transaction,
/// and a single statement outside `BEGIN` is its own transaction: it rolled back. A
/// `FATAL` or `PANIC` error ends the session, and an I/O or protocol error leaves us
/// without the server's answer; in those cases the commit may have happened.
fn rolled_back(err: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = err else {
        return false;
    };
    db.try_downcast_ref::<PgDatabaseError>()
        .is_some_and(|pg| pg.severity() == PgSeverity::Error)
}

impl Inner {
    /// Writes one batch and replies to each of its callers.
    async fn commit_batch(&self, batch: Vec<AppendRequest>) {
        metrics::histogram!("thalo_group_commit_batch_size").record(batch.len() as f64);
        if batch.len() == 1 {
            // Nothing to share the commit with: the plain append statement is cheaper
            // for the server than the batch statement over arrays of one.
            self.append_each(batch).await;
            return;
        }
        match self.write_batch(&batch).await {
            Ok(results) => {
                for (request, result) in batch.into_iter().zip(results) {
                    // A caller that gave up waiting is no reason to stop.
                    let _ = request.reply.send(result);
                }
            }
            Err(BatchFailure::Raced) => {
                debug!(
                    requests = batch.len(),
                    "group commit raced a writer outside the batch: appending one by one"
                );
                self.append_each(batch).await;
            }
            Err(BatchFailure::Rejected(err)) => {
                // Nothing was stored: appending each request on its own gives the
                // request at fault its error and stores the others.
                debug!(
                    requests = batch.len(),
                    error = %err,
                    "group-commit batch rejected by the server: appending one by one"
                );
                self.append_each(batch).await;
            }
            Err(BatchFailure::Failed(err, context)) => {
                for request in batch {
                    let _ = request
                        .reply
                        .send(Err(Error::store(context, Arc::clone(&err))));
                }
            }
        }
    }

    /// Appends each request of `batch` with the plain append statement, concurrently
    /// (a batch's streams are distinct, so they do not race each other), and replies to
    /// each caller with its own result.
    async fn append_each(&self, batch: Vec<AppendRequest>) {
        let results = join_all(
            batch
                .iter()
                .map(|r| self.append_encoded(&self.pool, &r.batch)),
        )
        .await;
        for (request, result) in batch.into_iter().zip(results) {
            // A caller that gave up waiting is no reason to stop.
            let _ = request.reply.send(result);
        }
    }

    /// One statement, so one implicit transaction and one commit, for the whole batch;
    /// per request, its positions or its conflict. The statement's reply comes after its
    /// commit (durable with `synchronous_commit = on`), so nothing is returned before.
    async fn write_batch(
        &self,
        batch: &[AppendRequest],
    ) -> Result<Vec<Result<Vec<i64>, Error>>, BatchFailure> {
        let failed = |context: &'static str| {
            move |err: sqlx::Error| BatchFailure::Failed(Arc::new(err), context)
        };
        let columns = Columns::new(batch);
        let notify = self.notify == NotifyMode::InTransaction;
        let sql = if notify {
            &self.sql.append_group_notify
        } else {
            &self.sql.append_group
        };
        let mut query = sqlx::query(sql)
            .bind(&columns.req)
            .bind(&columns.aggregate_types)
            .bind(&columns.aggregate_ids)
            .bind(&columns.expected)
            .bind(&columns.metadata)
            .bind(&columns.timestamps)
            .bind(&columns.event_req)
            .bind(&columns.ords)
            .bind(&columns.ids)
            .bind(&columns.types)
            .bind(&columns.versions)
            .bind(&columns.payloads);
        if notify {
            query = query.bind(&self.channel);
        }

        // No BEGIN/COMMIT round trips: a single statement commits on its own, all of it
        // or (on a raced stream, or any error) none of it.
        let rows = match query.fetch_all(&self.pool).await {
            Ok(rows) => rows,
            Err(err) if is_stream_conflict(&err) => return Err(BatchFailure::Raced),
            Err(err) if rolled_back(&err) => return Err(BatchFailure::Rejected(err)),
            Err(err) => return Err(failed("appending a group-commit batch")(err)),
        };
        // The batch is committed. A reply that cannot be decoded (which would take a
        // server that breaks the statement's contract) leaves every caller with an error,
        // as a connection lost after the commit would: their outcome is unknown.
        let mut results: Vec<Option<Result<Vec<i64>, Error>>> =
            batch.iter().map(|_| None).collect();
        for row in &rows {
            let decoded: Result<(i32, i64, Option<Vec<i64>>), sqlx::Error> =
                (|| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))();
            let (req, version, positions) =
                decoded.map_err(failed("decoding a group-commit result"))?;
            let slot = usize::try_from(req)
                .ok()
                .and_then(|i| Some((i, batch.get(i)?)));
            let Some((index, request)) = slot else {
                return Err(failed("decoding a group-commit result")(
                    sqlx::Error::Protocol(format!("unknown request index {req}")),
                ));
            };
            if let Some(result) = results.get_mut(index) {
                *result = Some(request.batch.check(version, positions));
            }
        }
        let results = results
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                failed("decoding a group-commit result")(sqlx::Error::Protocol(
                    "a request of the batch has no result row".into(),
                ))
            })?;
        if self.notify == NotifyMode::AfterCommit {
            let last = results
                .iter()
                .filter_map(|r| r.as_ref().ok()?.iter().max().copied())
                .max();
            if let Some(last) = last {
                self.announce(last);
            }
        }
        Ok(results)
    }
}

/// A batch as the statement's parameter arrays.
struct Columns<'a> {
    req: Vec<i32>,
    aggregate_types: Vec<&'static str>,
    aggregate_ids: Vec<&'a str>,
    expected: Vec<i64>,
    metadata: Vec<&'a str>,
    timestamps: Vec<DateTime<Utc>>,
    event_req: Vec<i32>,
    ords: Vec<i64>,
    ids: Vec<Uuid>,
    types: Vec<&'static str>,
    versions: Vec<i16>,
    payloads: Vec<&'a str>,
}

impl<'a> Columns<'a> {
    fn new(batch: &'a [AppendRequest]) -> Self {
        let events: usize = batch.iter().map(|r| r.batch.ids.len()).sum();
        let mut columns = Columns {
            req: Vec::with_capacity(batch.len()),
            aggregate_types: Vec::with_capacity(batch.len()),
            aggregate_ids: Vec::with_capacity(batch.len()),
            expected: Vec::with_capacity(batch.len()),
            metadata: Vec::with_capacity(batch.len()),
            timestamps: Vec::with_capacity(batch.len()),
            event_req: Vec::with_capacity(events),
            ords: Vec::with_capacity(events),
            ids: Vec::with_capacity(events),
            types: Vec::with_capacity(events),
            versions: Vec::with_capacity(events),
            payloads: Vec::with_capacity(events),
        };
        // `max_batch` is at most 65536, so the index always fits an int4.
        for (index, request) in batch.iter().enumerate() {
            let index = i32::try_from(index).unwrap_or(i32::MAX);
            let append = &request.batch;
            columns.req.push(index);
            columns.aggregate_types.push(append.aggregate_type);
            columns.aggregate_ids.push(&append.aggregate_id);
            columns.expected.push(append.expected);
            columns.metadata.push(&append.metadata);
            columns.timestamps.push(append.timestamp);
            for (ord, ((id, event_type), (version, payload))) in (1..).zip(
                append
                    .ids
                    .iter()
                    .zip(&append.types)
                    .zip(append.versions.iter().zip(&append.payloads)),
            ) {
                columns.event_req.push(index);
                columns.ords.push(ord);
                columns.ids.push(*id);
                columns.types.push(event_type);
                columns.versions.push(*version);
                columns.payloads.push(payload);
            }
        }
        columns
    }
}
