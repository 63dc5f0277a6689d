//! Stored transaction ids from another cluster: detecting them, and renumbering them.
//!
//! # Moving a store to another cluster
//!
//! Every event row records the id of the transaction that wrote it (`transaction_id`,
//! an `xid8`), and [`read_all`](thalo::EventStore::read_all) returns only rows whose id
//! is below the oldest transaction still running (see `global.rs`). Transaction ids are
//! a counter of the cluster, not of the data: a dump restored into another cluster, or
//! events copied there by logical replication, keep the ids of the cluster they came
//! from. When those are larger than the new cluster's counter, the restored events stay
//! behind the read horizon until the counter catches up, and readers whose cursor is on
//! one of them never see the events appended since (their transaction ids are smaller,
//! so they sort before the cursor). Nothing fails; readers just go quiet.
//!
//! [`PgEventStore::migrate`] therefore checks, after migrating, that every stored id is
//! below the cluster's next one, and refuses with [`Error::Config`] otherwise;
//! [`PgEventStore::check_transaction_ids`] runs the same check on its own. To repair a
//! store, stop its writers and call [`PgEventStore::rebase_transaction_ids`] once, in
//! the new cluster, before anything appends there. It renumbers the stored ids
//! `3, 4, 5, ...` in their old order, so the global order `(transaction_id, position)`
//! is unchanged, positions and checkpoints stay valid, and every new append sorts after
//! the restored events. The same by hand, with the store's schema for `thalo`:
//!
//! ```sql
//! BEGIN;
//! LOCK TABLE thalo.events IN EXCLUSIVE MODE;
//! -- Must be below pg_snapshot_xmax(pg_current_snapshot()) minus 2; if it is not, run
//! -- `SELECT pg_current_xact_id();` (one transaction each) until it is.
//! SELECT count(DISTINCT transaction_id) FROM thalo.events;
//! UPDATE thalo.events e
//! SET transaction_id = (r.n + 2)::text::xid8
//! FROM (SELECT transaction_id, dense_rank() OVER (ORDER BY transaction_id) AS n
//!       FROM (SELECT DISTINCT transaction_id FROM thalo.events) d) r
//! WHERE e.transaction_id = r.transaction_id
//!   AND e.transaction_id <> (r.n + 2)::text::xid8;
//! COMMIT;
//! ```
//!
//! Events appended in the new cluster before the rebase carry its (smaller) ids and
//! would end up ordered before the restored events: rebase before anything appends,
//! which is what the check in `migrate` enforces for applications that migrate at
//! startup.

use sqlx::{Connection, PgConnection};
use thalo::Error;
use tracing::{info, warn};

use crate::error::store;
use crate::{PgEventStore, SchemaName};

/// The first transaction id the rebase hands out minus one: dense ranks start at 1, and
/// ids 0 to 2 are reserved by Postgres (invalid, bootstrap, frozen), so the renumbered
/// ids start at 3.
const RANK_OFFSET: u64 = 2;

/// How many ids to burn between two progress messages while advancing the counter.
const PROGRESS_EVERY: u64 = 10_000;

/// Assigns a transaction id to its own (autocommit) transaction and returns it: each
/// run moves the cluster's counter by one.
const NEXT_XACT_ID: &str = "SELECT pg_current_xact_id()::text";

/// The statements of this module, for one schema.
struct RebaseSql {
    /// The largest stored transaction id and the cluster's next one, as text (sqlx has
    /// no `xid8` type). The next id comes from the snapshot rather than from
    /// `pg_current_xact_id()`, which would assign an id to the checking transaction
    /// for nothing (and fail on a read-only standby).
    ids: String,
    /// How many distinct transaction ids are stored, and the cluster's next id.
    distinct: String,
    /// Stops appends (and other writers) until the rebase commits; readers go on.
    lock: String,
    /// Renumbers the stored ids by their dense rank, in their old order.
    renumber: String,
}

impl RebaseSql {
    fn new(schema: &SchemaName) -> Self {
        let events = schema.qualify("events");
        RebaseSql {
            ids: format!(
                "SELECT max(transaction_id)::text,
       pg_snapshot_xmax(pg_current_snapshot())::text
FROM {events}"
            ),
            distinct: format!(
                "SELECT count(DISTINCT transaction_id),
       pg_snapshot_xmax(pg_current_snapshot())::text
FROM {events}"
            ),
            lock: format!("LOCK TABLE {events} IN EXCLUSIVE MODE"),
            renumber: format!(
                "UPDATE {events} e
SET transaction_id = (r.n + {RANK_OFFSET})::text::xid8
FROM (SELECT transaction_id, dense_rank() OVER (ORDER BY transaction_id) AS n
      FROM (SELECT DISTINCT transaction_id FROM {events}) d) r
WHERE e.transaction_id = r.transaction_id
  AND e.transaction_id <> (r.n + {RANK_OFFSET})::text::xid8"
            ),
        }
    }
}

/// A transaction id printed by Postgres.
fn parse_xid(text: &str) -> Result<u64, Error> {
    text.parse()
        .map_err(|e| Error::store(format!("decoding the transaction id `{text}`"), e))
}

/// The largest stored transaction id (none for an empty table) and the cluster's next
/// one.
async fn transaction_ids(
    conn: &mut PgConnection,
    sql: &RebaseSql,
) -> Result<(Option<u64>, u64), Error> {
    let (max, next): (Option<String>, String) = sqlx::query_as(&sql.ids)
        .fetch_one(&mut *conn)
        .await
        .map_err(store("reading the stored transaction ids"))?;
    Ok((
        max.as_deref().map(parse_xid).transpose()?,
        parse_xid(&next)?,
    ))
}

/// How many distinct transaction ids are stored, and the cluster's next id.
async fn distinct_ids(conn: &mut PgConnection, sql: &RebaseSql) -> Result<(u64, u64), Error> {
    let (count, next): (i64, String) = sqlx::query_as(&sql.distinct)
        .fetch_one(&mut *conn)
        .await
        .map_err(store("counting the stored transaction ids"))?;
    let count =
        u64::try_from(count).map_err(|e| Error::store("counting the stored transaction ids", e))?;
    Ok((count, parse_xid(&next)?))
}

/// Whether renumbering `count` ids leaves all of them below `next`.
fn fits_below(count: u64, next: u64) -> bool {
    count.saturating_add(RANK_OFFSET) < next
}

/// The error for stored ids at or above the cluster's next one.
fn ahead_of_cluster(schema: &SchemaName, max: u64, next: u64) -> Error {
    Error::config(format!(
        "the events table {events} holds transaction ids up to {max}, but this cluster's \
         next transaction id is {next}: the events were probably restored from a dump or \
         replicated from another cluster. Readers (read_all, subscriptions, the outbox \
         relay) would not see new events until the cluster's transaction ids pass {max}. \
         With the store's writers stopped, call PgEventStore::rebase_transaction_ids() \
         once, or run the SQL in the docs of thalo_postgres' rebase module (\"Moving a \
         store to another cluster\")",
        events = schema.qualify("events"),
    ))
}

/// Checks that every stored transaction id is below the cluster's next one, on `conn`.
pub(crate) async fn check(conn: &mut PgConnection, schema: &SchemaName) -> Result<(), Error> {
    let sql = RebaseSql::new(schema);
    match transaction_ids(conn, &sql).await? {
        (Some(max), next) if max >= next => Err(ahead_of_cluster(schema, max, next)),
        _ => Ok(()),
    }
}

/// Runs `SELECT pg_current_xact_id()` in autocommit statements, each assigning one
/// transaction id, until `count` renumbered ids fit below the cluster's next id.
async fn advance_counter(
    conn: &mut PgConnection,
    sql: &RebaseSql,
    count: u64,
) -> Result<(), Error> {
    let (_, mut next) = distinct_ids(&mut *conn, sql).await?;
    let target = count.saturating_add(RANK_OFFSET);
    if next <= target {
        warn!(
            next,
            target, "advancing the cluster's transaction ids before renumbering the events"
        );
    }
    let mut burned = 0_u64;
    while next <= target {
        let current: String = sqlx::query_scalar(NEXT_XACT_ID)
            .fetch_one(&mut *conn)
            .await
            .map_err(store("advancing the transaction id counter"))?;
        next = parse_xid(&current)?.saturating_add(1);
        burned += 1;
        if burned % PROGRESS_EVERY == 0 {
            info!(next, target, "advancing the cluster's transaction ids");
        }
    }
    Ok(())
}

impl PgEventStore {
    /// Checks that every transaction id stored in the events table is below the
    /// cluster's next one, as it is unless the events came from another cluster (a
    /// restored dump, logical replication). [`migrate`](PgEventStore::migrate) runs this
    /// check too. See [`rebase_transaction_ids`](PgEventStore::rebase_transaction_ids)
    /// for why it matters and how to repair a store that fails it.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Config`] naming the largest stored id, the cluster's next id and
    /// the fix when a stored id is not below the cluster's, and [`Error::Store`] when the
    /// query fails.
    pub async fn check_transaction_ids(&self) -> Result<(), Error> {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(store("acquiring a connection"))?;
        check(&mut conn, &self.inner.schema).await
    }

    /// Renumbers the transaction ids stored with the events so that all of them are
    /// below the cluster's, after the store was moved from another cluster; returns the
    /// number of rows renumbered (0 when every stored id is below the cluster's next
    /// one already: nothing is written then).
    ///
    /// `read_all` orders events by `(transaction_id, position)` and returns only rows
    /// below the read horizon, so ids from a cluster whose counter was ahead of this one
    /// hide every restored event and every new one from readers (see the module docs of
    /// `rebase`, "Moving a store to another cluster", for the whole story and the same
    /// repair in SQL).
    ///
    /// The distinct stored ids become `3, 4, 5, ...` in their old order, so the global
    /// order, the positions and every reader's checkpoint stay as they were. It runs in
    /// one transaction that holds `LOCK TABLE events IN EXCLUSIVE MODE`: appends wait
    /// for it, readers do not. When the cluster has handed out fewer ids than there are
    /// distinct stored ones (a young cluster), it first advances the cluster's counter by
    /// running `SELECT pg_current_xact_id()` in autocommit statements, one id each,
    /// logging its progress.
    ///
    /// Call it once, with the store's writers stopped, before anything appends in the
    /// new cluster: events appended there before the rebase carry smaller ids and would
    /// be ordered before the restored events.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when a statement fails; the renumbering is then rolled
    /// back as a whole.
    pub async fn rebase_transaction_ids(&self) -> Result<u64, Error> {
        let inner = &self.inner;
        let sql = RebaseSql::new(&inner.schema);
        let mut conn = inner
            .pool
            .acquire()
            .await
            .map_err(store("acquiring a connection"))?;
        let (max, next) = transaction_ids(&mut conn, &sql).await?;
        match max {
            Some(max) if max >= next => {}
            _ => return Ok(0),
        }
        let (count, next) = distinct_ids(&mut conn, &sql).await?;
        if !fits_below(count, next) {
            advance_counter(&mut conn, &sql, count).await?;
        }

        let mut tx = conn
            .begin()
            .await
            .map_err(store("beginning the transaction id rebase"))?;
        sqlx::query(&sql.lock)
            .execute(&mut *tx)
            .await
            .map_err(store("locking the events table"))?;
        // Counted again under the lock: appends committed since the first count add ids.
        let (count, next) = distinct_ids(&mut tx, &sql).await?;
        if !fits_below(count, next) {
            return Err(Error::store(
                "renumbering transaction ids",
                format!(
                    "{count} distinct transaction ids do not fit below the cluster's next \
                     id {next}; try again"
                ),
            ));
        }
        let renumbered = sqlx::query(&sql.renumber)
            .execute(&mut *tx)
            .await
            .map_err(store("renumbering transaction ids"))?
            .rows_affected();
        tx.commit()
            .await
            .map_err(store("committing the transaction id rebase"))?;
        info!(
            schema = %inner.schema,
            renumbered,
            distinct = count,
            "renumbered the events' transaction ids below the cluster's"
        );
        Ok(renumbered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renumbered_ids_must_stay_below_the_next_one() {
        // Ranks 1..=n become ids 3..=n+2.
        assert!(fits_below(10, 13));
        assert!(!fits_below(10, 12));
        assert!(!fits_below(u64::MAX, u64::MAX));
    }

    #[test]
    fn statements_are_schema_qualified() {
        let sql = RebaseSql::new(&SchemaName::new("billing").unwrap());
        for statement in [&sql.ids, &sql.distinct, &sql.lock, &sql.renumber] {
            assert!(statement.contains("\"billing\".events"), "{statement}");
        }
        assert!(sql.renumber.contains("(r.n + 2)::text::xid8"));
    }

    #[test]
    fn the_error_says_what_happened_and_how_to_fix_it() {
        let err = ahead_of_cluster(&SchemaName::default(), 1_000_000_750, 760);
        let message = err.to_string();
        for part in [
            "1000000750",
            "760",
            "restored",
            "rebase_transaction_ids",
            "\"thalo\".events",
        ] {
            assert!(message.contains(part), "{part} missing from: {message}");
        }
        assert!(matches!(err, Error::Config { .. }));
    }
}
