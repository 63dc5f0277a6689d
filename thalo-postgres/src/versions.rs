//! Projection versions: rebuilding a read model without downtime (blue/green).
//!
//! A projection whose read model changes (a new column, a fixed bug in its logic) gets a
//! new [`version`](crate::PgProjection::version). Each version keeps its own checkpoints
//! ([`checkpoint_key`]) and writes its own tables ([`ReadModelTable`]: `balances_v2`
//! beside `balances_v1`), so the new version is built from position 0 of the store while
//! the live one keeps serving reads and applying new events. Readers query a view
//! (`balances`) that points at the live version's tables; [`PgEventStore::promote`]
//! repoints it in one transaction, so a read sees the old version or the new one, never
//! an error or a half-built table. The old tables stay until
//! [`PgEventStore::drop_version`].
//!
//! Readers name the columns they read (`SELECT account, cents FROM balances`): a new
//! version may add columns, and a reader that names its columns reads either version
//! through its cached prepared statement. A version that changes the type of a column
//! readers select, or removes one, needs readers deployed with it; and a prepared
//! `SELECT *` fails with "cached plan must not change result type" once the view's
//! columns change (a cached statement for good, an unnamed one if the swap falls between
//! its parse and its execution).
//!
//! [`PgSubscription::with_read_model`](crate::PgSubscription::with_read_model) does all
//! of it: it registers its version, builds it, and promotes it the first time it has
//! caught up with the store (at once when no version is live yet) if it is newer than
//! the live version; a retired version that starts again (an old deployment) does not
//! take over, only [`PgEventStore::promote`] brings it back. A Kafka-fed
//! projection is rebuilt the same way, from the store, and then handed to its consumer:
//! its consumer group derives from the version's checkpoint key (`balances@v2`), so the
//! new version reads its topics from the start in a group of its own, and the stream
//! checkpoints the rebuild left make it skip every event the rebuild applied and apply
//! every later one.
//!
//! ```no_run
//! # use thalo::Error;
//! # use thalo_postgres::{PgEventStore, ReadModelTable};
//! # async fn example(store: PgEventStore) -> Result<(), Error> {
//! let v2 = ReadModelTable::new(store.schema(), "balances", 2)?;
//! assert_eq!(v2.table(), "\"thalo\".balances_v2"); // what version 2 writes
//! assert_eq!(v2.view(), "\"thalo\".balances"); // what readers query
//! for version in store.projection_versions("balances").await? {
//!     println!("v{} {:?}", version.version, version.state);
//! }
//! # Ok(())
//! # }
//! ```

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use thalo::Error;

use crate::error::store;
use crate::{sql, PgEventStore, SchemaName};

/// The name a projection's checkpoints are kept under: its name for version 1 (so a
/// projection that never had versions keeps its checkpoints), `name@vN` for version N.
///
/// ```
/// use thalo_postgres::checkpoint_key;
///
/// assert_eq!(checkpoint_key("balances", 1), "balances");
/// assert_eq!(checkpoint_key("balances", 3), "balances@v3");
/// ```
pub fn checkpoint_key(name: &str, version: u32) -> Cow<'_, str> {
    if version <= 1 {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(format!("{name}@v{version}"))
    }
}

/// One table of a versioned read model: the table a version writes (`balances_v2`) and
/// the view readers query (`balances`), both in the store's schema.
///
/// The projection creates its table (`CREATE TABLE IF NOT EXISTS {table}`) and writes
/// only to it; readers use only the view. [`PgEventStore::promote`] points the view at
/// the promoted version's table.
///
/// This is where read-model tables go: in the store's schema, named qualified, because
/// a projection's transaction keeps the pool's `search_path` (see
/// [`PgProjection`](crate::PgProjection#where-read-model-tables-go)). It is also the
/// way to rebuild a read model: renaming a projection gives it new checkpoints but
/// leaves its tables as they are, while a new version writes tables of its own.
///
/// ```
/// use thalo_postgres::{ReadModelTable, SchemaName};
///
/// let schema = SchemaName::new("bank").unwrap();
/// let v2 = ReadModelTable::new(&schema, "balances", 2).unwrap();
/// assert_eq!(v2.table(), "\"bank\".balances_v2");
/// assert_eq!(v2.view(), "\"bank\".balances");
/// assert!(ReadModelTable::new(&schema, "Balances; DROP", 2).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadModelTable {
    name: String,
    version: u32,
    table: String,
    view: String,
}

impl ReadModelTable {
    /// The table of `name` (a plain lowercase identifier, at most 50 characters) for
    /// `version` (at least 1), in `schema`.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Config`] for a name that is not a plain identifier, or version 0.
    pub fn new(schema: &SchemaName, name: &str, version: u32) -> Result<Self, Error> {
        let plain = !name.is_empty()
            && name.len() <= 50
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !plain {
            return Err(Error::config(format!(
                "read-model table name `{name}` must match [a-z_][a-z0-9_]* and be at most \
                 50 characters"
            )));
        }
        if version == 0 {
            return Err(Error::config(format!(
                "read model `{name}`: versions start at 1"
            )));
        }
        Ok(ReadModelTable {
            name: name.to_owned(),
            version,
            table: schema.qualify(&format!("{name}_v{version}")),
            view: schema.qualify(name),
        })
    }

    /// The read model's name (the view's, unqualified).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version this table belongs to.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The qualified table this version writes, e.g. `"thalo".balances_v2`.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The qualified view readers query, e.g. `"thalo".balances`.
    pub fn view(&self) -> &str {
        &self.view
    }
}

/// Where a projection version stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VersionState {
    /// Being built; readers do not see it yet.
    Building,
    /// What readers see.
    Live,
    /// Was live; its tables stay until [`PgEventStore::drop_version`].
    Retired,
}

impl VersionState {
    fn parse(state: &str) -> Result<Self, Error> {
        match state {
            "building" => Ok(VersionState::Building),
            "live" => Ok(VersionState::Live),
            "retired" => Ok(VersionState::Retired),
            other => Err(Error::store(
                "reading projection versions",
                format!("unknown state `{other}`"),
            )),
        }
    }

    /// The state as stored: `building`, `live` or `retired`.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Building => "building",
            VersionState::Live => "live",
            VersionState::Retired => "retired",
        }
    }
}

/// One version of a projection, as [`PgEventStore::projection_versions`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionVersion {
    /// The projection's name.
    pub projection: String,
    /// The version.
    pub version: u32,
    /// Building, live or retired.
    pub state: VersionState,
    /// The qualified tables of this version.
    pub tables: Vec<String>,
    /// The qualified views that point at them while this version is live.
    pub views: Vec<String>,
    /// When the version was registered.
    pub created_at: DateTime<Utc>,
    /// When it was last promoted.
    pub live_at: Option<DateTime<Utc>>,
    /// When it was last retired.
    pub retired_at: Option<DateTime<Utc>>,
}

fn lock_key(schema: &SchemaName, projection: &str) -> String {
    format!("thalo:projection-versions:{schema}:{projection}")
}

fn version_i32(version: u32) -> Result<i32, Error> {
    i32::try_from(version)
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| Error::config(format!("projection version {version} is out of range")))
}

impl PgEventStore {
    /// Every version of `projection`, oldest first.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the database fails.
    pub async fn projection_versions(
        &self,
        projection: &str,
    ) -> Result<Vec<ProjectionVersion>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT projection, version, state, tables, views, created_at, live_at, retired_at
             FROM {} WHERE projection = $1 ORDER BY version",
            self.inner.schema.qualify("projection_versions")
        ))
        .bind(projection)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(store("reading projection versions"))?;
        rows.iter().map(version_from_row).collect()
    }

    /// The live version of `projection`, if any.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the database fails.
    pub async fn live_version(&self, projection: &str) -> Result<Option<u32>, Error> {
        let version: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT version FROM {} WHERE projection = $1 AND state = 'live'",
            self.inner.schema.qualify("projection_versions")
        ))
        .bind(projection)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(store("reading the live projection version"))?;
        Ok(version.and_then(|v| u32::try_from(v).ok()))
    }

    /// Registers `version` of `projection` with its tables (as building), unless it is
    /// registered already, and returns its state. When no version of the projection is
    /// live, the new one is promoted at once: with nothing else to serve, an empty read
    /// model that fills up beats a view that does not exist.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the database fails (e.g. a table that does not
    /// exist yet while the version is promoted).
    pub async fn register_version(
        &self,
        projection: &str,
        version: u32,
        tables: &[ReadModelTable],
    ) -> Result<VersionState, Error> {
        let mut tx = self.begin_locked(projection).await?;
        let state =
            insert_version(&mut tx, &self.inner.schema, projection, version, tables).await?;
        let state = if state == VersionState::Building
            && live_in(&mut tx, &self.inner.schema, projection)
                .await?
                .is_none()
        {
            promote_in(&mut tx, &self.inner.schema, projection, version, tables).await?;
            VersionState::Live
        } else {
            state
        };
        tx.commit()
            .await
            .map_err(store("committing a projection version"))?;
        Ok(state)
    }

    /// Makes `version` of `projection` the live one, in one transaction: the live
    /// version (if another) is retired, and every view in `tables` is pointed at this
    /// version's table. Readers of a view wait for the transaction (a moment) and then
    /// read the new table; none fails.
    ///
    /// Promoting an older, retired version back is allowed (a rollback); its tables are
    /// as current as whatever kept applying events to them.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Config`] when a table belongs to another version, and
    /// [`Error::Store`] when the database fails (e.g. a table that does not exist, or a
    /// view name taken by a table).
    pub async fn promote(
        &self,
        projection: &str,
        version: u32,
        tables: &[ReadModelTable],
    ) -> Result<(), Error> {
        let mut tx = self.begin_locked(projection).await?;
        insert_version(&mut tx, &self.inner.schema, projection, version, tables).await?;
        promote_in(&mut tx, &self.inner.schema, projection, version, tables).await?;
        tx.commit()
            .await
            .map_err(store("committing a projection promotion"))?;
        Ok(())
    }

    /// [`promote`](PgEventStore::promote) for a registered version, with the tables it
    /// was registered with: what an operator runs to roll back to a retired version (or
    /// to promote one by hand) without the projection's code.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Config`] when the version is not registered, and
    /// [`Error::Store`] when the database fails.
    pub async fn promote_registered(&self, projection: &str, version: u32) -> Result<(), Error> {
        let schema = &self.inner.schema;
        let mut tx = self.begin_locked(projection).await?;
        let Some((_, tables, views)) = registered(&mut tx, schema, projection, version).await?
        else {
            return Err(Error::config(format!(
                "projection `{projection}` has no version {version} in schema `{schema}`"
            )));
        };
        let pairs: Vec<(String, String)> = views.into_iter().zip(tables).collect();
        promote_pairs(&mut tx, schema, projection, version, &pairs).await?;
        tx.commit()
            .await
            .map_err(store("committing a projection promotion"))?;
        Ok(())
    }

    /// Promotes `version` if it is still building and newer than the live version (or
    /// none is live); whether it did. What a subscription does once it has caught up: a
    /// retired version that restarts (an old deployment) never takes over again, nor
    /// does an older one that is still building.
    pub(crate) async fn promote_if_building(
        &self,
        projection: &str,
        version: u32,
        tables: &[ReadModelTable],
    ) -> Result<bool, Error> {
        let schema = &self.inner.schema;
        let mut tx = self.begin_locked(projection).await?;
        let state = insert_version(&mut tx, schema, projection, version, tables).await?;
        let live = live_in(&mut tx, schema, projection).await?;
        let newer = live.is_none_or(|live| i64::from(live) < i64::from(version));
        if state != VersionState::Building || !newer {
            return Ok(false);
        }
        promote_in(&mut tx, schema, projection, version, tables).await?;
        tx.commit()
            .await
            .map_err(store("committing a projection promotion"))?;
        Ok(true)
    }

    /// Drops a retired (or never promoted) version of `projection`: its tables, its
    /// checkpoints and its parked streams, and its entry. Returns whether there was one.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Config`] for the live version, and [`Error::Store`] when the
    /// database fails.
    pub async fn drop_version(&self, projection: &str, version: u32) -> Result<bool, Error> {
        let schema = &self.inner.schema;
        let mut tx = self.begin_locked(projection).await?;
        let Some((state, tables, _)) = registered(&mut tx, schema, projection, version).await?
        else {
            return Ok(false);
        };
        if state == VersionState::Live {
            return Err(Error::config(format!(
                "version {version} of projection `{projection}` is live: promote another \
                 version first"
            )));
        }
        for table in &tables {
            // Stored by `insert_version` from a validated `ReadModelTable`.
            sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                .execute(&mut *tx)
                .await
                .map_err(store("dropping a projection version's table"))?;
        }
        let key = checkpoint_key(projection, version);
        for (table, column) in [
            ("checkpoints", "name"),
            ("stream_checkpoints", "projection"),
            ("consumer_parked", "consumer"),
        ] {
            sqlx::query(&format!(
                "DELETE FROM {} WHERE {column} = $1",
                schema.qualify(table)
            ))
            .bind(key.as_ref())
            .execute(&mut *tx)
            .await
            .map_err(store("dropping a projection version's checkpoints"))?;
        }
        sqlx::query(&format!(
            "DELETE FROM {} WHERE projection = $1 AND version = $2",
            schema.qualify("projection_versions")
        ))
        .bind(projection)
        .bind(version_i32(version)?)
        .execute(&mut *tx)
        .await
        .map_err(store("dropping a projection version"))?;
        tx.commit()
            .await
            .map_err(store("committing a dropped projection version"))?;
        Ok(true)
    }
}

impl PgEventStore {
    /// A transaction holding the lock on `projection`'s versions.
    async fn begin_locked(
        &self,
        projection: &str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, Error> {
        let mut tx = self
            .inner
            .pool
            .begin()
            .await
            .map_err(store("beginning a projection version transaction"))?;
        lock(&mut tx, &self.inner.schema, projection).await?;
        Ok(tx)
    }
}

/// The state, tables and views of a registered version.
async fn registered(
    conn: &mut PgConnection,
    schema: &SchemaName,
    projection: &str,
    version: u32,
) -> Result<Option<(VersionState, Vec<String>, Vec<String>)>, Error> {
    let row = sqlx::query(&format!(
        "SELECT state, tables, views FROM {} WHERE projection = $1 AND version = $2",
        schema.qualify("projection_versions")
    ))
    .bind(projection)
    .bind(version_i32(version)?)
    .fetch_optional(conn)
    .await
    .map_err(store("reading a projection version"))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let decode = |err| Error::store("decoding a projection version", err);
    let state: String = row.try_get(0).map_err(decode)?;
    Ok(Some((
        VersionState::parse(&state)?,
        row.try_get(1).map_err(decode)?,
        row.try_get(2).map_err(decode)?,
    )))
}

async fn lock(conn: &mut PgConnection, schema: &SchemaName, projection: &str) -> Result<(), Error> {
    sqlx::query(sql::ADVISORY_XACT_LOCK)
        .bind(lock_key(schema, projection))
        .execute(conn)
        .await
        .map_err(store("locking the projection's versions"))?;
    Ok(())
}

async fn live_in(
    conn: &mut PgConnection,
    schema: &SchemaName,
    projection: &str,
) -> Result<Option<i32>, Error> {
    sqlx::query_scalar(&format!(
        "SELECT version FROM {} WHERE projection = $1 AND state = 'live'",
        schema.qualify("projection_versions")
    ))
    .bind(projection)
    .fetch_optional(conn)
    .await
    .map_err(store("reading the live projection version"))
}

/// Inserts the version as building if it is not there; returns its state.
async fn insert_version(
    conn: &mut PgConnection,
    schema: &SchemaName,
    projection: &str,
    version: u32,
    tables: &[ReadModelTable],
) -> Result<VersionState, Error> {
    if let Some(other) = tables.iter().find(|t| t.version() != version) {
        return Err(Error::config(format!(
            "table {} belongs to version {}, not to version {version} of `{projection}`",
            other.table(),
            other.version()
        )));
    }
    let table_names: Vec<&str> = tables.iter().map(ReadModelTable::table).collect();
    let views: Vec<&str> = tables.iter().map(ReadModelTable::view).collect();
    let state: String = sqlx::query_scalar(&format!(
        "WITH inserted AS (
             INSERT INTO {versions} (projection, version, state, tables, views)
             VALUES ($1, $2, 'building', $3, $4)
             ON CONFLICT (projection, version) DO NOTHING
             RETURNING state
         )
         SELECT state FROM inserted
         UNION ALL
         SELECT state FROM {versions} WHERE projection = $1 AND version = $2
         LIMIT 1",
        versions = schema.qualify("projection_versions")
    ))
    .bind(projection)
    .bind(version_i32(version)?)
    .bind(&table_names)
    .bind(&views)
    .fetch_one(conn)
    .await
    .map_err(store("registering a projection version"))?;
    VersionState::parse(&state)
}

async fn promote_in(
    conn: &mut PgConnection,
    schema: &SchemaName,
    projection: &str,
    version: u32,
    tables: &[ReadModelTable],
) -> Result<(), Error> {
    let pairs: Vec<(String, String)> = tables
        .iter()
        .map(|t| (t.view().to_owned(), t.table().to_owned()))
        .collect();
    promote_pairs(conn, schema, projection, version, &pairs).await
}

/// Promotes with `(view, table)` pairs, qualified names that come from validated
/// [`ReadModelTable`]s (now or when the version was registered).
async fn promote_pairs(
    conn: &mut PgConnection,
    schema: &SchemaName,
    projection: &str,
    version: u32,
    pairs: &[(String, String)],
) -> Result<(), Error> {
    let versions = schema.qualify("projection_versions");
    let version = version_i32(version)?;
    sqlx::query(&format!(
        "UPDATE {versions} SET state = 'retired', retired_at = now()
         WHERE projection = $1 AND state = 'live' AND version <> $2"
    ))
    .bind(projection)
    .bind(version)
    .execute(&mut *conn)
    .await
    .map_err(store("retiring the live projection version"))?;
    let views: Vec<&str> = pairs.iter().map(|(view, _)| view.as_str()).collect();
    let table_names: Vec<&str> = pairs.iter().map(|(_, table)| table.as_str()).collect();
    sqlx::query(&format!(
        "UPDATE {versions} SET state = 'live', live_at = now(), tables = $3, views = $4
         WHERE projection = $1 AND version = $2"
    ))
    .bind(projection)
    .bind(version)
    .bind(&table_names)
    .bind(&views)
    .execute(&mut *conn)
    .await
    .map_err(store("promoting the projection version"))?;
    for (view, table) in pairs {
        // Both names come from a validated `ReadModelTable`.
        sqlx::query(&format!("DROP VIEW IF EXISTS {view}"))
            .execute(&mut *conn)
            .await
            .map_err(store("dropping the read model's view"))?;
        sqlx::query(&format!("CREATE VIEW {view} AS SELECT * FROM {table}"))
            .execute(&mut *conn)
            .await
            .map_err(store(
                "pointing the read model's view at the promoted version",
            ))?;
    }
    Ok(())
}

fn version_from_row(row: &sqlx::postgres::PgRow) -> Result<ProjectionVersion, Error> {
    let decode = |err| Error::store("decoding a projection version", err);
    let version: i32 = row.try_get(1).map_err(decode)?;
    let state: String = row.try_get(2).map_err(decode)?;
    Ok(ProjectionVersion {
        projection: row.try_get(0).map_err(decode)?,
        version: u32::try_from(version).unwrap_or_default(),
        state: VersionState::parse(&state)?,
        tables: row.try_get(3).map_err(decode)?,
        views: row.try_get(4).map_err(decode)?,
        created_at: row.try_get(5).map_err(decode)?,
        live_at: row.try_get(6).map_err(decode)?,
        retired_at: row.try_get(7).map_err(decode)?,
    })
}
