//! Projections into Postgres with exactly-once effects.
//!
//! # How exactly-once works here
//!
//! Delivery is at least once everywhere: a subscription re-reads the batch it crashed in,
//! Kafka redelivers after a rebalance, the outbox relay may publish an event twice. The
//! effects become exactly once because the read-model change and the record of what was
//! applied commit in the same Postgres transaction:
//!
//! 1. Lock (creating them at 0 if missing) the rows of `stream_checkpoints` for the
//!    projection and every stream in the batch. Locking serialises two appliers of the
//!    same projection and stream (say, two consumers during a rebalance), so they cannot
//!    both apply the same event.
//! 2. Skip each envelope whose sequence is not above its stream's stored sequence (a
//!    duplicate or a redelivery), and hand the others, in order, to
//!    [`PgProjection::handle_batch`] (by default [`PgProjection::handle`] for each) with
//!    the transaction's connection.
//! 3. Store the new sequences, then commit.
//!
//! A stream is never applied past a hole. An envelope whose sequence is not the next one
//! (the checkpoint says 4, the envelope is 6) parks the stream with an error naming the
//! missing sequence, and so does a consumer that gives up on an event: the stream's
//! later events are *held* (counted, not applied) until a re-drive applies them from the
//! store in order ([`PgEventStore::redrive_projection`]), or an operator skips the
//! missing one ([`PgEventStore::skip_parked`]). Other streams go on. See
//! [`ParkedStream`](crate::ParkedStream).
//!
//! If anything fails, the transaction rolls back: neither the read-model change nor the
//! checkpoint is stored, and the batch is applied again on retry. If the commit succeeded,
//! the sequences say so, and a redelivered event is skipped.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;

use sqlx::{PgConnection, Row};
use thalo::{Error, Event, EventEnvelope};

use crate::error::{store, to_i64, to_u64};
use crate::PgEventStore;

/// A projection that keeps its read model in the event store's database and updates it
/// through the transaction it is given, for exactly-once effects.
///
/// Run it in process with [`PgSubscription`](crate::PgSubscription), or from Kafka with
/// [`PgEventStore::apply_exactly_once`] per batch (`thalo_kafka`'s
/// `KafkaConsumer::run_projection` does).
///
/// ```no_run
/// use sqlx::PgConnection;
/// use thalo::{Error, EventEnvelope, ResultExt as _};
/// use thalo_postgres::{PgEventStore, PgProjection};
/// # #[derive(Clone, Debug)] pub enum AccountEvent { Deposited { amount: i64 } }
/// # impl thalo::Event for AccountEvent {
/// #     fn event_type(&self) -> &'static str { "Deposited" }
/// #     fn encode(&self) -> Result<String, Error> { unimplemented!() }
/// #     fn decode(_: &str, _: u16, _: &str) -> Result<Self, Error> { unimplemented!() }
/// #     fn event_types() -> &'static [&'static str] { &["Deposited"] }
/// # }
///
/// struct Balances {
///     upsert: String,
/// }
///
/// impl Balances {
///     /// The read model's table in the store's schema: `"thalo".balances`.
///     fn new(store: &PgEventStore) -> Self {
///         let table = store.schema().qualify("balances");
///         Balances {
///             upsert: format!(
///                 "INSERT INTO {table} (account, cents) VALUES ($1, $2)
///                  ON CONFLICT (account) DO UPDATE SET cents = {table}.cents + EXCLUDED.cents"
///             ),
///         }
///     }
/// }
///
/// impl PgProjection<AccountEvent> for Balances {
///     fn name(&self) -> &str {
///         "balances"
///     }
///
///     async fn handle(
///         &self,
///         tx: &mut PgConnection,
///         envelope: &EventEnvelope<AccountEvent>,
///     ) -> Result<(), Error> {
///         let AccountEvent::Deposited { amount } = envelope.event;
///         sqlx::query(&self.upsert)
///             .bind(&envelope.aggregate_id)
///             .bind(amount)
///             .execute(tx)
///             .await
///             .store_err("updating balances")?;
///         Ok(())
///     }
/// }
/// ```
///
/// # Identity: name and version
///
/// A projection is known by its *checkpoint key*, [`checkpoint_key`](crate::checkpoint_key)
/// of its [`name`](PgProjection::name) and [`version`](PgProjection::version) (`balances`
/// for version 1, `balances@v2` for version 2). The key names its checkpoints (the
/// `checkpoints` row of a [`PgSubscription`](crate::PgSubscription), its
/// `stream_checkpoints` rows) and its parked streams; `thalo_kafka` derives the
/// projection's Kafka consumer group from it too (`<group prefix><checkpoint key>`).
///
/// Renaming a projection, or bumping its version, therefore gives it new, empty
/// checkpoints (and a new consumer group): it is handed every event again from the
/// start, of the store for a subscription, of the topics for a Kafka consumer. Its
/// read-model tables are *not* cleared or switched: a renamed projection that writes
/// the same tables applies every event again on top of the rows there. The way to
/// rebuild a read model is a new version that writes tables of its own
/// ([`ReadModelTable`](crate::ReadModelTable): `balances_v2` beside `balances_v1`),
/// built from the store beside the live version and promoted once it has caught up,
/// which repoints the views readers query
/// ([`PgSubscription::with_read_model`](crate::PgSubscription::with_read_model); see
/// [`versions`](crate::ReadModelTable)). The old version's checkpoints and tables stay
/// until [`PgEventStore::drop_version`].
///
/// # Where read-model tables go
///
/// In the store's schema, named schema-qualified:
///
/// - a versioned read model: [`ReadModelTable::new(store.schema(), "balances", version)`](crate::ReadModelTable::new);
///   write to its [`table()`](crate::ReadModelTable::table) (`"thalo".balances_v2`),
///   read from its [`view()`](crate::ReadModelTable::view) (`"thalo".balances`);
/// - a table of its own: [`store.schema().qualify("balances")`](crate::SchemaName::qualify)
///   (`"thalo".balances`).
///
/// The transaction handed to [`handle`](PgProjection::handle) is a connection of the
/// store's pool with the pool's `search_path`: Thalo does not change it (the store's
/// own SQL names its tables qualified). It is deliberately not set to the store's
/// schema, where the store's own tables (`events`, `outbox`, `checkpoints`,
/// `stream_checkpoints`, ...) live: an unqualified name could then resolve to one of
/// them, and projections whose tables live elsewhere (`public`) would stop finding
/// them. Build the qualified names once (the SQL strings, as above) rather than per
/// event; the schema name is validated, so formatting it into SQL is safe.
pub trait PgProjection<E: Event>: Send + Sync {
    /// Stable name, with the [`version`](PgProjection::version) the key of the
    /// projection's checkpoints ([`checkpoint_key`](crate::checkpoint_key)) and, fed
    /// from Kafka, of its consumer group. Changing it starts the projection over with
    /// new checkpoints, without clearing its tables (see
    /// [Identity](PgProjection#identity-name-and-version)).
    fn name(&self) -> &str;

    /// The version of the read model (default 1). Give a changed read model a new
    /// version with tables of its own ([`ReadModelTable`](crate::ReadModelTable)): it is
    /// built from the start of the store beside the live version and takes over once it
    /// has caught up (see [`versions`](crate::ReadModelTable) and
    /// [`PgSubscription::with_read_model`](crate::PgSubscription::with_read_model)). A new
    /// version has new checkpoints (and, fed from Kafka, a new consumer group).
    fn version(&self) -> u32 {
        1
    }

    /// Applies one event to the read model, using only `tx` (an open transaction that
    /// also commits the checkpoint). Must not commit or roll back `tx`. `tx` has the
    /// pool's `search_path`: name tables qualified (see
    /// [Where read-model tables go](PgProjection#where-read-model-tables-go)).
    ///
    /// # Errors
    ///
    /// Any error rolls back the whole batch, read model and checkpoints alike. What
    /// happens next depends on the runner: a [`PgSubscription`](crate::PgSubscription)
    /// stops and returns it; a Kafka consumer retries it a few times and then parks
    /// the event's stream (and retries outages until they end). The rule, for every
    /// runner, is in `thalo_kafka`'s crate docs ("Errors in handlers: retry or
    /// dead-letter").
    fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<E>,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Applies the events of one batch, in delivery order (sequence order within each
    /// stream), using only `tx`. It gets only events that were not applied before:
    /// duplicates and redeliveries are filtered out first, and the stream checkpoints
    /// are saved in `tx` after it returns. The default calls
    /// [`handle`](PgProjection::handle) for each event; override it to change the read
    /// model with fewer statements (one multi-row upsert per batch, say), which is what
    /// makes a projection fast: each statement is a round trip.
    ///
    /// ```no_run
    /// use std::collections::BTreeMap;
    ///
    /// use sqlx::PgConnection;
    /// use thalo::{Error, EventEnvelope};
    /// use thalo_postgres::PgProjection;
    /// # #[derive(Clone, Debug)] pub enum AccountEvent { Deposited { amount: i64 } }
    /// # impl thalo::Event for AccountEvent {
    /// #     fn event_type(&self) -> &'static str { "Deposited" }
    /// #     fn encode(&self) -> Result<String, Error> { unimplemented!() }
    /// #     fn decode(_: &str, _: u16, _: &str) -> Result<Self, Error> { unimplemented!() }
    /// #     fn event_types() -> &'static [&'static str] { &["Deposited"] }
    /// # }
    ///
    /// struct Balances {
    ///     /// `INSERT INTO "thalo".balances ... SELECT * FROM UNNEST($1::text[], $2::int8[])
    ///     /// ON CONFLICT ...`, built once from `store.schema().qualify("balances")`.
    ///     upsert: String,
    /// }
    ///
    /// impl PgProjection<AccountEvent> for Balances {
    ///     fn name(&self) -> &str {
    ///         "balances"
    ///     }
    ///
    ///     async fn handle(
    ///         &self,
    ///         tx: &mut PgConnection,
    ///         envelope: &EventEnvelope<AccountEvent>,
    ///     ) -> Result<(), Error> {
    ///         self.handle_batch(tx, &[envelope]).await
    ///     }
    ///
    ///     async fn handle_batch(
    ///         &self,
    ///         tx: &mut PgConnection,
    ///         envelopes: &[&EventEnvelope<AccountEvent>],
    ///     ) -> Result<(), Error> {
    ///         // One row per account, whatever the number of events.
    ///         let mut sums: BTreeMap<&str, i64> = BTreeMap::new();
    ///         for envelope in envelopes {
    ///             let AccountEvent::Deposited { amount } = envelope.event;
    ///             *sums.entry(envelope.aggregate_id.as_str()).or_default() += amount;
    ///         }
    ///         let (accounts, amounts): (Vec<&str>, Vec<i64>) = sums.into_iter().unzip();
    ///         sqlx::query(&self.upsert)
    ///             .bind(&accounts)
    ///             .bind(&amounts)
    ///             .execute(tx)
    ///             .await
    ///             .map_err(|e| Error::store("updating balances", e))?;
    ///         Ok(())
    ///     }
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// Any error rolls back the whole batch, read model and checkpoints alike.
    fn handle_batch(
        &self,
        tx: &mut PgConnection,
        envelopes: &[&EventEnvelope<E>],
    ) -> impl Future<Output = Result<(), Error>> + Send {
        async move {
            for envelope in envelopes {
                self.handle(&mut *tx, envelope).await?;
            }
            Ok(())
        }
    }
}

impl<E: Event, P: PgProjection<E>> PgProjection<E> for std::sync::Arc<P> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn version(&self) -> u32 {
        (**self).version()
    }

    fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<E>,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        (**self).handle(tx, envelope)
    }

    fn handle_batch(
        &self,
        tx: &mut PgConnection,
        envelopes: &[&EventEnvelope<E>],
    ) -> impl Future<Output = Result<(), Error>> + Send {
        (**self).handle_batch(tx, envelopes)
    }
}

/// What [`PgEventStore::apply_exactly_once`] did with a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Applied {
    /// Envelopes handed to the projection.
    pub applied: usize,
    /// Envelopes skipped because they were applied already: their stream's checkpoint
    /// was at or past them (redeliveries, relay duplicates). The same count as
    /// `thalo_kafka::ConsumerStats::duplicates`.
    pub duplicates: usize,
    /// Envelopes held, not applied, because their stream is parked (see
    /// [`PgEventStore::redrive_projection`]).
    pub held: usize,
}

impl std::ops::AddAssign for Applied {
    fn add_assign(&mut self, other: Applied) {
        self.applied += other.applied;
        self.duplicates += other.duplicates;
        self.held += other.held;
    }
}

impl PgEventStore {
    /// Applies `envelopes` to `projection` with exactly-once effects, in one transaction
    /// of its own: events at or below their stream's stored sequence are skipped, the
    /// others are handled in order, and the new sequences commit with the read-model
    /// changes. See the [module docs](crate::PgProjection) for the protocol.
    ///
    /// Envelopes of one stream must come in sequence order (as the store and Kafka
    /// partitions deliver them); envelopes of different streams may be interleaved.
    /// Meant for a consumer's batch, e.g. the decoded messages of one Kafka partition.
    ///
    /// # Errors
    ///
    /// Returns the projection's error as [`Error::Handler`] (nothing of the batch is
    /// stored) and [`Error::Store`] when the database fails.
    pub async fn apply_exactly_once<E, P>(
        &self,
        projection: &P,
        envelopes: &[EventEnvelope<E>],
    ) -> Result<Applied, Error>
    where
        E: Event,
        P: PgProjection<E>,
    {
        if envelopes.is_empty() {
            return Ok(Applied::default());
        }
        let mut tx = self
            .inner
            .pool
            .begin()
            .await
            .map_err(store("beginning a projection transaction"))?;
        let applied = self
            .apply_exactly_once_in(&mut tx, projection, envelopes)
            .await?;
        tx.commit()
            .await
            .map_err(store("committing a projection transaction"))?;
        Ok(applied)
    }

    /// [`apply_exactly_once`](PgEventStore::apply_exactly_once) inside the caller's
    /// transaction, which the caller commits (e.g. together with a Kafka partition's
    /// offset saved with [`save_checkpoint_in`](PgEventStore::save_checkpoint_in)).
    ///
    /// On error, part of the batch may have been applied in the transaction: roll it
    /// back.
    ///
    /// # Errors
    ///
    /// As [`PgEventStore::apply_exactly_once`].
    pub async fn apply_exactly_once_in<E, P>(
        &self,
        conn: &mut PgConnection,
        projection: &P,
        envelopes: &[EventEnvelope<E>],
    ) -> Result<Applied, Error>
    where
        E: Event,
        P: PgProjection<E>,
    {
        let mut outcome = Applied::default();
        if envelopes.is_empty() {
            return Ok(outcome);
        }
        let key = crate::checkpoint_key(projection.name(), projection.version());
        let name = key.as_ref();
        let sql = &self.inner.sql;

        // Sorted and distinct: every applier locks in the same order.
        let keys: BTreeSet<(&str, &str)> = envelopes
            .iter()
            .map(|e| (e.aggregate_type.as_str(), e.aggregate_id.as_str()))
            .collect();
        let (types, ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        let rows = sqlx::query(&sql.lock_stream_checkpoints)
            .bind(name)
            .bind(&types)
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(store("locking stream checkpoints"))?;
        let mut stored: HashMap<(&str, &str), (u64, bool)> = HashMap::with_capacity(rows.len());
        // Streams parked before this batch, and those this batch parks (with the missing
        // sequence), each with how many of its envelopes were held.
        let mut parked: HashMap<(&str, &str), u64> = HashMap::new();
        let mut gaps: HashMap<(&str, &str), (u64, u64)> = HashMap::new();
        for row in &rows {
            let aggregate_type: &str = row
                .try_get(0)
                .map_err(store("decoding a stream checkpoint"))?;
            let aggregate_id: &str = row
                .try_get(1)
                .map_err(store("decoding a stream checkpoint"))?;
            let sequence: i64 = row
                .try_get(2)
                .map_err(store("decoding a stream checkpoint"))?;
            let is_parked: bool = row
                .try_get(3)
                .map_err(store("decoding a stream checkpoint"))?;
            if let Some(&key) = keys.get(&(aggregate_type, aggregate_id)) {
                stored.insert(key, (to_u64(sequence, "stream checkpoint")?, false));
                if is_parked {
                    parked.insert(key, 0);
                }
            }
        }

        // The envelopes not applied before, in delivery order.
        let mut fresh: Vec<&EventEnvelope<E>> = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            let key = (
                envelope.aggregate_type.as_str(),
                envelope.aggregate_id.as_str(),
            );
            let checkpoint = stored.entry(key).or_insert((0, false));
            if envelope.sequence <= checkpoint.0 {
                outcome.duplicates += 1;
                continue;
            }
            if let Some(held) = parked.get_mut(&key) {
                *held += 1;
                outcome.held += 1;
                continue;
            }
            if let Some((_, held)) = gaps.get_mut(&key) {
                *held += 1;
                outcome.held += 1;
                continue;
            }
            if envelope.sequence != checkpoint.0 + 1 {
                // A hole: never apply past it. The stream is parked until a re-drive
                // fills it from the store (or an operator skips it).
                gaps.insert(key, (checkpoint.0 + 1, 1));
                outcome.held += 1;
                continue;
            }
            fresh.push(envelope);
            *checkpoint = (envelope.sequence, true);
            outcome.applied += 1;
        }
        if !fresh.is_empty() {
            projection
                .handle_batch(&mut *conn, &fresh)
                .await
                .map_err(|err| match err {
                    err @ Error::Handler { .. } => err,
                    err => Error::handler(name, err),
                })?;
        }

        let mut types = Vec::new();
        let mut ids = Vec::new();
        let mut sequences = Vec::new();
        for ((aggregate_type, aggregate_id), (sequence, changed)) in &stored {
            if *changed {
                types.push(*aggregate_type);
                ids.push(*aggregate_id);
                sequences.push(to_i64(*sequence, "sequence")?);
            }
        }
        if !sequences.is_empty() {
            sqlx::query(&sql.save_stream_checkpoints)
                .bind(name)
                .bind(&types)
                .bind(&ids)
                .bind(&sequences)
                .execute(&mut *conn)
                .await
                .map_err(store("saving stream checkpoints"))?;
        }
        // Rare paths: only batches that meet a parked stream or a hole pay for them.
        let held: Vec<((&str, &str), u64)> = parked.into_iter().filter(|(_, n)| *n > 0).collect();
        crate::parking::hold_in(conn, &self.inner.parking, name, &held).await?;
        for (stream, (missing, held)) in gaps {
            let error = format!(
                "event {missing} of {} `{}` never arrived: the next one did first (a gap in \
                 the stream: an event the relay skipped, or one older than the topic's \
                 retention); re-drive the stream from the store",
                stream.0, stream.1
            );
            crate::parking::park_in(
                conn,
                &self.inner.parking,
                name,
                stream,
                missing,
                &error,
                held,
            )
            .await?;
        }
        Ok(outcome)
    }
}
