//! Loading aggregates (snapshot + later events) and reading streams.

use futures_util::TryStreamExt;
use sqlx::PgConnection;
use thalo::{Aggregate, Error, Event, EventEnvelope, Loaded};
use tracing::{debug, warn};

use crate::error::{store, to_i64};
use crate::row;
use crate::store::Inner;

/// The outcome of replaying a stream.
enum Replay<A> {
    Done {
        aggregate: A,
        version: u64,
        /// Events applied (after the snapshot, if one was used).
        replayed: u64,
    },
    /// The snapshot could not be decoded; replay without it.
    BadSnapshot,
}

impl Inner {
    pub(crate) async fn load<A: Aggregate>(&self, id: &A::Id) -> Result<Loaded<A>, Error> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(store("acquiring a connection"))?;
        self.load_on(&mut conn, id).await
    }

    /// [`Inner::load`] on a given connection. Every load passes here: the `load` span
    /// (`events`: how many were replayed after the snapshot, if one was used).
    #[tracing::instrument(
        level = "debug",
        name = "load",
        skip_all,
        fields(aggregate_type = A::TYPE, aggregate_id = %id, events, version)
    )]
    pub(crate) async fn load_on<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &A::Id,
    ) -> Result<Loaded<A>, Error> {
        let aggregate_id = id.to_string();
        let every = self.snapshots.every(A::TYPE);
        let replay = match self
            .replay::<A>(conn, id, &aggregate_id, every.is_some())
            .await?
        {
            Replay::BadSnapshot => self.replay::<A>(conn, id, &aggregate_id, false).await?,
            done => done,
        };
        let Replay::Done {
            aggregate,
            version,
            replayed,
        } = replay
        else {
            return Err(Error::store(
                "loading an aggregate",
                "replay without a snapshot reported a bad snapshot",
            ));
        };
        tracing::Span::current()
            .record("events", replayed)
            .record("version", version);
        if let Some(every) = every {
            if replayed >= every {
                self.save_snapshot(conn, &aggregate, &aggregate_id, version)
                    .await;
            }
        }
        Ok(Loaded { aggregate, version })
    }

    /// Streams the snapshot (if `with_snapshot`) and the events after it, applying each
    /// event as its row arrives.
    async fn replay<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &A::Id,
        aggregate_id: &str,
        with_snapshot: bool,
    ) -> Result<Replay<A>, Error> {
        let query = if with_snapshot {
            sqlx::query(&self.sql.load_with_snapshot)
                .bind(A::TYPE)
                .bind(aggregate_id)
        } else {
            sqlx::query(&self.sql.load)
                .bind(A::TYPE)
                .bind(aggregate_id)
                .bind(0_i64)
        };
        let mut rows = query.fetch(&mut *conn);
        let mut aggregate: Option<A> = None;
        let mut version = 0;
        let mut replayed = 0;
        while let Some(row) = rows.try_next().await.map_err(store("loading events"))? {
            let row = row::load_row(&row)?;
            let Some(event_type) = row.event_type else {
                match A::from_snapshot(row.payload) {
                    Ok(restored) => {
                        aggregate = Some(restored);
                        version = row.sequence;
                    }
                    Err(err) => {
                        warn!(
                            aggregate_type = A::TYPE,
                            aggregate_id,
                            snapshot_version = row.sequence,
                            error = %err,
                            "ignoring a snapshot that cannot be decoded, replaying all events"
                        );
                        return Ok(Replay::BadSnapshot);
                    }
                }
                continue;
            };
            let event = A::Event::decode_from(A::TYPE, event_type, row.event_version, row.payload)?;
            aggregate
                .get_or_insert_with(|| A::new(id.clone()))
                .apply(event);
            version = row.sequence;
            replayed += 1;
        }
        Ok(Replay::Done {
            aggregate: aggregate.unwrap_or_else(|| A::new(id.clone())),
            version,
            replayed,
        })
    }

    /// Stores a snapshot of `aggregate` at `version`. Best effort: a failure only costs
    /// the next load some replay, so it is logged, not returned.
    async fn save_snapshot<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        aggregate: &A,
        aggregate_id: &str,
        version: u64,
    ) {
        let payload = match aggregate.to_snapshot() {
            None => return,
            Some(Ok(payload)) => payload,
            Some(Err(err)) => {
                warn!(aggregate_type = A::TYPE, aggregate_id, error = %err, "cannot serialize a snapshot");
                return;
            }
        };
        let Ok(version_i64) = i64::try_from(version) else {
            return;
        };
        let saved = sqlx::query(&self.sql.save_snapshot)
            .bind(A::TYPE)
            .bind(aggregate_id)
            .bind(version_i64)
            .bind(payload)
            .execute(&mut *conn)
            .await;
        match saved {
            Ok(_) => debug!(
                aggregate_type = A::TYPE,
                aggregate_id, version, "snapshot saved"
            ),
            Err(err) => {
                warn!(aggregate_type = A::TYPE, aggregate_id, error = %err, "cannot save a snapshot")
            }
        }
    }

    pub(crate) async fn read_stream<A: Aggregate>(
        &self,
        id: &A::Id,
        after_sequence: u64,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        let rows = sqlx::query(&self.sql.read_stream)
            .bind(A::TYPE)
            .bind(id.to_string())
            .bind(to_i64(after_sequence, "sequence")?)
            .fetch_all(&self.pool)
            .await
            .map_err(store("reading a stream"))?;
        rows.iter().map(row::decoded).collect()
    }
}
