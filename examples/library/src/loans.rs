//! The read side: the books each member has on loan, a table kept by a projection.

use serde::{Deserialize, Serialize};
use thalo::{Error, EventEnvelope, ResultExt as _};
use thalo_postgres::sqlx::{self, PgConnection, PgPool, Row as _};
use thalo_postgres::{PgEventStore, PgProjection};
use uuid::Uuid;

use crate::member::{MemberEvent, MemberId};

/// A book on loan, as `GET /members/{id}/loans` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loan {
    /// The book.
    pub book: String,
    /// The correlation id of the request that borrowed it, carried from the HTTP
    /// request through the store and Kafka in the event's metadata.
    pub correlation_id: Option<Uuid>,
}

/// The `loans` read model: one row per book on loan, in the store's schema.
///
/// Its SQL is built once, from the table's schema-qualified name; every value is a bound
/// parameter.
#[derive(Clone, Debug)]
pub struct Loans {
    pool: PgPool,
    insert: String,
    delete: String,
    select: String,
}

impl Loans {
    /// The read model of `store`, its table created if needed.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the table cannot be created.
    pub async fn new(store: &PgEventStore) -> Result<Self, Error> {
        // `"library".loans`: read-model tables live in the store's schema, named
        // qualified (a projection's transaction keeps the pool's `search_path`).
        let table = store.schema().qualify("loans");
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                member_id      TEXT NOT NULL,
                book           TEXT NOT NULL,
                correlation_id UUID,
                PRIMARY KEY (member_id, book)
            )"
        ))
        .execute(store.pool())
        .await
        .store_err("creating the loans table")?;
        Ok(Loans {
            pool: store.pool().clone(),
            insert: format!(
                "INSERT INTO {table} (member_id, book, correlation_id) VALUES ($1, $2, $3)"
            ),
            delete: format!("DELETE FROM {table} WHERE member_id = $1 AND book = $2"),
            select: format!(
                "SELECT book, correlation_id FROM {table} WHERE member_id = $1 ORDER BY book"
            ),
        })
    }

    /// The books `member` has on loan, by title.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the table cannot be read.
    pub async fn of(&self, member: &MemberId) -> Result<Vec<Loan>, Error> {
        let rows = sqlx::query(&self.select)
            .bind(&member.0)
            .fetch_all(&self.pool)
            .await
            .store_err("reading loans")?;
        rows.iter()
            .map(|row| {
                Ok(Loan {
                    book: row.try_get("book")?,
                    correlation_id: row.try_get("correlation_id")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .store_err("decoding loans")
    }
}

impl PgProjection<MemberEvent> for Loans {
    /// With the version (1), the key of the projection's checkpoints and of its Kafka
    /// consumer group (`loans`).
    fn name(&self) -> &str {
        "loans"
    }

    /// Runs in the transaction that also records the event as applied: a redelivered
    /// event is skipped, so a plain `INSERT` never sees its row twice.
    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<MemberEvent>,
    ) -> Result<(), Error> {
        let member = &envelope.aggregate_id;
        let query = match &envelope.event {
            MemberEvent::Joined(_) => return Ok(()),
            MemberEvent::Borrowed(borrowed) => sqlx::query(&self.insert)
                .bind(member)
                .bind(&borrowed.book)
                .bind(envelope.metadata.correlation_id),
            MemberEvent::Returned(returned) => {
                sqlx::query(&self.delete).bind(member).bind(&returned.book)
            }
        };
        query.execute(tx).await.store_err("updating loans")?;
        Ok(())
    }
}
