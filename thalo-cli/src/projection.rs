//! `thalo projection`: every reader with a checkpoint in the store, and resets.
//!
//! Two kinds keep checkpoints:
//!
//! - **store-fed**: `PgSubscription` (and `thalo::Subscription` over this store) keep
//!   a global position per name in `checkpoints`. Lag: the events after it in the
//!   global order, counted, and the age of the oldest of them.
//! - **Kafka-fed**: projections run by `KafkaConsumer::run_projection`, and handlers
//!   with a store (their parked streams), keep a sequence per stream in
//!   `stream_checkpoints` and no global position. Lag: the store's last sequence minus
//!   the checkpointed one, summed over the streams it has seen, and the age of the
//!   oldest unapplied event. A stream whose first event has not reached it yet is not
//!   counted: the consumer group's lag (`thalo status`) covers those.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use crate::args::{Global, ProjectionCommand, ResetArgs};
use crate::error::{CliError, Result};
use crate::kafka::Kafka;
use crate::output::{self, section, table, Report};
use crate::store::Store;

/// Where a reader gets its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    /// From the store's global log (a `checkpoints` row).
    StoreFed,
    /// From Kafka (`stream_checkpoints` rows only).
    KafkaFed,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::StoreFed => "store-fed",
            Kind::KafkaFed => "kafka-fed",
        }
    }
}

/// A projection or handler and how far behind it is.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProjectionView {
    pub name: String,
    pub kind: Kind,
    /// The checkpointed global position (store-fed).
    pub position: Option<u64>,
    /// The streams it has a checkpoint for (Kafka-fed).
    pub streams: Option<u64>,
    /// Events it has not applied yet.
    pub behind: u64,
    /// Age of the oldest of them, in seconds.
    pub oldest_unapplied_age_seconds: Option<f64>,
    /// Streams it parked.
    pub parked_streams: u64,
    /// When the checkpoint last moved (store-fed).
    pub updated_at: Option<String>,
    #[serde(skip)]
    pub oldest_unapplied_age: Option<Duration>,
}

/// Every projection with a checkpoint, by name.
pub(crate) async fn list(store: &Store) -> Result<Vec<ProjectionView>> {
    let parked: HashMap<String, i64> = sqlx::query(&store.sql.parked_per_consumer)
        .fetch_all(&store.pool)
        .await
        .map_err(CliError::sql("counting parked streams"))?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(CliError::sql("decoding parked streams"))?;
    let parked_of = |name: &str| parked.get(name).map_or(0, |n| to_u64(*n));
    let mut views = Vec::new();

    let rows = sqlx::query(&store.sql.store_fed)
        .fetch_all(&store.pool)
        .await
        .map_err(CliError::sql("measuring store-fed projections"))?;
    for row in rows {
        let decode = || -> Result<_, sqlx::Error> {
            let name: String = row.try_get(0)?;
            let position: i64 = row.try_get(1)?;
            let updated_at: DateTime<Utc> = row.try_get(2)?;
            let behind: i64 = row.try_get(3)?;
            let oldest: Option<f64> = row.try_get(4)?;
            Ok((name, position, updated_at, behind, oldest))
        };
        let (name, position, updated_at, behind, oldest) =
            decode().map_err(CliError::sql("decoding store-fed projections"))?;
        let oldest = output::from_seconds(oldest);
        views.push(ProjectionView {
            parked_streams: parked_of(&name),
            name,
            kind: Kind::StoreFed,
            position: Some(to_u64(position)),
            streams: None,
            behind: to_u64(behind),
            oldest_unapplied_age_seconds: output::seconds(oldest),
            updated_at: Some(output::time(&updated_at)),
            oldest_unapplied_age: oldest,
        });
    }

    let rows = sqlx::query(&store.sql.kafka_fed)
        .fetch_all(&store.pool)
        .await
        .map_err(CliError::sql("measuring Kafka-fed projections"))?;
    for row in rows {
        let decode = || -> Result<_, sqlx::Error> {
            let name: String = row.try_get(0)?;
            let streams: i64 = row.try_get(1)?;
            let behind: i64 = row.try_get(2)?;
            let oldest: Option<f64> = row.try_get(3)?;
            Ok((name, streams, behind, oldest))
        };
        let (name, streams, behind, oldest) =
            decode().map_err(CliError::sql("decoding Kafka-fed projections"))?;
        let oldest = output::from_seconds(oldest);
        views.push(ProjectionView {
            parked_streams: parked_of(&name),
            name,
            kind: Kind::KafkaFed,
            position: None,
            streams: Some(to_u64(streams)),
            behind: to_u64(behind),
            oldest_unapplied_age_seconds: output::seconds(oldest),
            updated_at: None,
            oldest_unapplied_age: oldest,
        });
    }
    views.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(views)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The projections table.
pub(crate) fn write_table(out: &mut String, heading: &str, views: &[ProjectionView]) {
    let mut projections = table([
        "NAME",
        "KIND",
        "POSITION / STREAMS",
        "BEHIND (EVENTS)",
        "OLDEST UNAPPLIED",
        "PARKED STREAMS",
    ]);
    for view in views {
        let at = match (view.position, view.streams) {
            (Some(position), _) => format!("position {position}"),
            (None, Some(streams)) => output::count(streams, "stream", "streams"),
            (None, None) => "-".to_owned(),
        };
        projections.add_row([
            view.name.clone(),
            view.kind.as_str().to_owned(),
            at,
            view.behind.to_string(),
            output::age(view.oldest_unapplied_age),
            view.parked_streams.to_string(),
        ]);
    }
    section(out, heading, &projections);
}

#[derive(Debug, Serialize)]
struct ListReport {
    projections: Vec<ProjectionView>,
}

impl Report for ListReport {
    fn text(&self) -> String {
        let mut out = String::new();
        write_table(&mut out, "Projections", &self.projections);
        out
    }
}

/// What a reset deleted.
#[derive(Debug, Serialize)]
struct ResetReport {
    name: String,
    /// `checkpoints` rows deleted (0 or 1).
    checkpoints: u64,
    /// `stream_checkpoints` rows deleted.
    stream_checkpoints: u64,
    /// Parked streams deleted (each recorded in `parking_log` as `reset`).
    parked_streams: u64,
    /// The consumer group deleted with `--reset-group`, if any.
    group_deleted: Option<String>,
    #[serde(skip)]
    group_missing: Option<String>,
}

impl Report for ResetReport {
    fn text(&self) -> String {
        let mut out = format!(
            "reset `{}`: deleted {}, {} and {}\n",
            self.name,
            output::count(self.checkpoints, "checkpoint", "checkpoints"),
            output::count(
                self.stream_checkpoints,
                "stream checkpoint",
                "stream checkpoints"
            ),
            output::count(self.parked_streams, "parked stream", "parked streams"),
        );
        match (&self.group_deleted, &self.group_missing) {
            (Some(group), _) => out.push_str(&format!(
                "deleted Kafka consumer group `{group}`: the projection re-reads its topics from \
                 the start (as far as the topics' retention reaches; `thalo republish` fills the \
                 rest)\n"
            )),
            (None, Some(group)) => out.push_str(&format!(
                "Kafka consumer group `{group}` did not exist: nothing to reset there\n"
            )),
            (None, None) => out.push_str(
                "the Kafka consumer group's offsets were not reset: a Kafka-fed projection \
                 resumes where its group left off (use --reset-group)\n",
            ),
        }
        out.push_str(
            "the read-model tables are the projection's own: clear them before it starts again\n",
        );
        out
    }
}

pub(crate) async fn run(store: &Store, global: &Global, command: ProjectionCommand) -> Result<()> {
    match command {
        ProjectionCommand::List => output::emit(
            &ListReport {
                projections: list(store).await?,
            },
            global.json,
        ),
        ProjectionCommand::Reset(args) => {
            output::emit(&reset(store, global, args).await?, global.json)
        }
        ProjectionCommand::Versions { name } => {
            crate::versions::run_versions(store, &name, global.json).await
        }
        ProjectionCommand::Rebuild(args) => {
            crate::versions::run_rebuild(store, args, global.json).await
        }
        ProjectionCommand::Promote(args) => {
            crate::versions::run_promote(store, args, global.json).await
        }
        ProjectionCommand::Drop(args) => crate::versions::run_drop(store, args, global.json).await,
    }
}

async fn reset(store: &Store, global: &Global, args: ResetArgs) -> Result<ResetReport> {
    if !args.yes {
        return Err(CliError::usage(format!(
            "resetting `{}` deletes its checkpoints and parked streams: pass --yes to do it",
            args.name
        )));
    }
    let known = list(store).await?.iter().any(|p| p.name == args.name);
    if !known {
        return Err(CliError::UnknownProjection {
            name: args.name,
            schema: store.schema.as_str().to_owned(),
        });
    }
    // Kafka first: a group that still has members refuses, and then nothing is reset.
    // (The other way round, a failed group deletion would leave a projection without
    // checkpoints resuming mid-topic: it would park every stream on a gap.)
    let (mut group_deleted, mut group_missing) = (None, None);
    if args.reset_group {
        let kafka = Kafka::new(&global.kafka)?;
        let group = args
            .group
            .clone()
            .unwrap_or_else(|| kafka.projection_group(&args.name));
        if kafka.delete_group(&group).await? {
            group_deleted = Some(group);
        } else {
            group_missing = Some(group);
        }
    }
    let mut tx = store
        .pool
        .begin()
        .await
        .map_err(CliError::sql("beginning the reset"))?;
    let checkpoints = sqlx::query(&store.sql.reset_checkpoint)
        .bind(&args.name)
        .execute(&mut *tx)
        .await
        .map_err(CliError::sql("deleting the checkpoint"))?
        .rows_affected();
    let parked_streams = sqlx::query(&store.sql.reset_parked)
        .bind(&args.name)
        .execute(&mut *tx)
        .await
        .map_err(CliError::sql("deleting the parked streams"))?
        .rows_affected();
    let stream_checkpoints = sqlx::query(&store.sql.reset_stream_checkpoints)
        .bind(&args.name)
        .execute(&mut *tx)
        .await
        .map_err(CliError::sql("deleting the stream checkpoints"))?
        .rows_affected();
    tx.commit()
        .await
        .map_err(CliError::sql("committing the reset"))?;
    Ok(ResetReport {
        name: args.name,
        checkpoints,
        stream_checkpoints,
        parked_streams,
        group_deleted,
        group_missing,
    })
}
