//! Reading the global log without ever skipping a late commit.
//!
//! # Why not `WHERE position > $cursor`
//!
//! Positions come from an identity sequence, handed out when a row is inserted, but rows
//! become visible when their transaction commits, and transactions do not commit in the
//! order they took their positions. Writer A inserts position 10, writer B inserts 11 and
//! commits; a reader sees 11, moves its cursor there; then A commits 10, behind the cursor,
//! and a `position > 11` reader never sees it. Under load this happens all the time.
//!
//! # The transaction-id horizon
//!
//! Every row records the id of the transaction that wrote it (`transaction_id`, a
//! `xid8`, defaulting to `pg_current_xact_id()`). `pg_snapshot_xmin(pg_current_snapshot())`
//! is the oldest transaction id still running: every transaction below it has finished,
//! so the set of rows with `transaction_id < xmin` is final, and nothing can ever appear
//! among them again. The global order is therefore `(transaction_id, position)`, and a
//! read returns only rows below the horizon, in that order. Readers keep a plain `u64`
//! position as their cursor: the read looks up the `transaction_id` of the event at that
//! position (or of the last event before it, for a position that was never committed or
//! 0 for the start) and continues with rows whose `(transaction_id, position)` is greater.
//! Within one transaction, positions are in append order, so each stream stays in
//! sequence order.
//!
//! The price: a long-running transaction, anywhere in the cluster (xids are
//! cluster-wide), holds the horizon back, and readers see nothing newer until it ends. Keep
//! write transactions short. So that a reader still sees its own writes promptly, a read
//! that finds committed rows only above the horizon waits for the horizon to pass them,
//! polling with a short backoff for up to `horizon_wait`, and returns an empty page after
//! that (readers poll again later; nothing is skipped either way). Positions can therefore
//! be out of numeric order in the global log (a transaction that took its id early may
//! append after one that took a later id), which is why cursors are looked up rather than
//! compared.

use std::time::Duration;

use sqlx::PgConnection;
use thalo::{Error, EventEnvelope, RawEvent};
use tokio::time::Instant;
use tracing::debug;

use crate::error::{store, to_i64};
use crate::row;
use crate::sql::Sql;
use crate::store::Inner;

/// What the global log holds after a cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Peek {
    /// No committed event.
    Nothing,
    /// Events a read would return.
    Ready,
    /// Committed events, held back behind the read horizon by an older transaction that
    /// is still running. The horizon moves without a notification.
    HeldBack,
}

impl Inner {
    /// What a read after `after_position` would find now.
    pub(crate) async fn peek_after(&self, after_position: u64) -> Result<Peek, Error> {
        let settled: Option<bool> = sqlx::query_scalar(&self.sql.peek_after)
            .bind(to_i64(after_position, "position")?)
            .fetch_optional(&self.pool)
            .await
            .map_err(store("checking for new events"))?;
        Ok(match settled {
            None => Peek::Nothing,
            Some(true) => Peek::Ready,
            Some(false) => Peek::HeldBack,
        })
    }
}

/// `read_all` on `conn`: up to `limit` settled events after the event at `after_position`.
pub(crate) async fn read_all(
    conn: &mut PgConnection,
    sql: &Sql,
    after_position: u64,
    limit: usize,
    horizon_wait: Duration,
) -> Result<Vec<EventEnvelope<RawEvent>>, Error> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let after = to_i64(after_position, "position")?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let deadline = Instant::now() + horizon_wait;
    let mut backoff = Duration::from_millis(1);
    loop {
        let rows = sqlx::query(&sql.read_all)
            .bind(after)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await
            .map_err(store("reading the global log"))?;
        // Settled rows sort before unsettled ones (they have smaller transaction ids), so
        // the settled rows are a prefix.
        let mut events = Vec::with_capacity(rows.len());
        let mut held_back = false;
        for row in &rows {
            if !row::settled(row)? {
                held_back = true;
                break;
            }
            events.push(row::raw(row)?);
        }
        let now = Instant::now();
        if !events.is_empty() || !held_back || now >= deadline {
            if events.is_empty() && held_back {
                debug!(
                    after_position,
                    "committed events are held back by an older running transaction"
                );
            }
            return Ok(events);
        }
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2).min(Duration::from_millis(50));
    }
}
