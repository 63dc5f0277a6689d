//! `thalo projection versions|rebuild|promote|drop`: projection versions and rebuilds
//! without downtime.
//!
//! A new version of a projection is built by the service that runs it
//! (`PgSubscription::with_read_model`, or `bank serve --balances-version N`): from
//! position 0 of the store, beside the live version, taking over once it has caught up.
//! The command line shows the versions, watches a rebuild with its progress, rolls back
//! by promoting a retired version, and drops the tables of a retired one.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use thalo_postgres::{checkpoint_key, VersionState};

use crate::args::{DropVersionArgs, PromoteArgs, RebuildArgs};
use crate::error::{CliError, Result};
use crate::output::{self, section, table, Report};
use crate::store::Store;

/// One version as the command line shows it.
#[derive(Debug, Serialize)]
struct VersionView {
    version: u32,
    state: &'static str,
    /// The checkpoint key of the version (`name` for 1, `name@vN` after).
    checkpoint: String,
    /// Its global position, when it is fed from the store.
    position: Option<u64>,
    tables: Vec<String>,
    views: Vec<String>,
    created_at: String,
    live_at: Option<String>,
    retired_at: Option<String>,
}

#[derive(Debug, Serialize)]
struct VersionsReport {
    projection: String,
    /// The store's head (its highest global position).
    head: u64,
    versions: Vec<VersionView>,
}

impl Report for VersionsReport {
    fn text(&self) -> String {
        let mut rows = table([
            "VERSION",
            "STATE",
            "CHECKPOINT",
            "POSITION",
            "TABLES",
            "LIVE SINCE",
            "RETIRED",
        ]);
        for v in &self.versions {
            rows.add_row([
                v.version.to_string(),
                v.state.to_owned(),
                v.checkpoint.clone(),
                v.position
                    .map_or_else(|| "-".to_owned(), |p| format!("{p} of {}", self.head)),
                v.tables.join(", "),
                v.live_at.clone().unwrap_or_else(|| "-".to_owned()),
                v.retired_at.clone().unwrap_or_else(|| "-".to_owned()),
            ]);
        }
        let mut out = String::new();
        section(
            &mut out,
            &format!("Versions of `{}`", self.projection),
            &rows,
        );
        out
    }
}

async fn versions(store: &Store, projection: &str) -> Result<VersionsReport> {
    let listed = store.store.projection_versions(projection).await?;
    if listed.is_empty() {
        return Err(CliError::UnknownVersions {
            name: projection.to_owned(),
            schema: store.schema.as_str().to_owned(),
        });
    }
    let mut versions = Vec::with_capacity(listed.len());
    for v in listed {
        let checkpoint = checkpoint_key(projection, v.version).into_owned();
        let position = checkpoint_position(store, &checkpoint).await?;
        versions.push(VersionView {
            version: v.version,
            state: v.state.as_str(),
            checkpoint,
            position,
            tables: v.tables,
            views: v.views,
            created_at: output::time(&v.created_at),
            live_at: v.live_at.as_ref().map(output::time),
            retired_at: v.retired_at.as_ref().map(output::time),
        });
    }
    Ok(VersionsReport {
        projection: projection.to_owned(),
        head: store.head().await?,
        versions,
    })
}

async fn checkpoint_position(store: &Store, key: &str) -> Result<Option<u64>> {
    let position: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT position FROM {} WHERE name = $1",
        store.schema.qualify("checkpoints")
    ))
    .bind(key)
    .fetch_optional(&store.pool)
    .await
    .map_err(CliError::sql("reading a checkpoint"))?;
    Ok(position.map(|p| u64::try_from(p).unwrap_or(0)))
}

#[derive(Debug, Serialize)]
struct RebuildReport {
    projection: String,
    version: u32,
    state: &'static str,
    /// The version's position when it went live (or when the watch ended).
    position: Option<u64>,
    head: u64,
    seconds: f64,
}

impl Report for RebuildReport {
    fn text(&self) -> String {
        format!(
            "version {} of `{}` is {} (position {} of {}) after {:.1} s\n",
            self.version,
            self.projection,
            self.state,
            self.position
                .map_or_else(|| "-".to_owned(), |p| p.to_string()),
            self.head,
            self.seconds,
        )
    }
}

/// Watches the rebuild of `version` until it is live, with a progress bar (position of
/// its checkpoint against the store's head, rate, ETA).
async fn rebuild(store: &Store, args: RebuildArgs, json: bool) -> Result<RebuildReport> {
    let started = Instant::now();
    let deadline = args.timeout_secs.map(|s| started + Duration::from_secs(s));
    let key = checkpoint_key(&args.name, args.number).into_owned();
    let progress = ProgressBar::with_draw_target(
        Some(store.head().await?.max(1)),
        if json {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} position {human_pos}/{human_len} \
         ({per_sec}, ETA {eta}) {msg}",
    ) {
        progress.set_style(style);
    }
    loop {
        let state = store
            .store
            .projection_versions(&args.name)
            .await?
            .into_iter()
            .find(|v| v.version == args.number)
            .map(|v| v.state);
        let head = store.head().await?;
        let position = checkpoint_position(store, &key).await?;
        progress.set_length(head.max(1));
        progress.set_position(position.unwrap_or(0).min(head));
        progress.set_message(match state {
            None => "waiting for the version to be deployed".to_owned(),
            Some(state) => state.as_str().to_owned(),
        });
        if let Some(state @ (VersionState::Live | VersionState::Retired)) = state {
            progress.finish_and_clear();
            return Ok(RebuildReport {
                projection: args.name,
                version: args.number,
                state: state.as_str(),
                position,
                head,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            progress.abandon();
            return Err(CliError::RebuildTimeout {
                name: args.name,
                version: args.number,
                state: state.map_or("not deployed", VersionState::as_str),
                position,
                head,
            });
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
}

#[derive(Debug, Serialize)]
struct ChangedReport {
    projection: String,
    version: u32,
    action: &'static str,
}

impl Report for ChangedReport {
    fn text(&self) -> String {
        match self.action {
            "promoted" => format!(
                "version {} of `{}` is live: its views point at its tables\n",
                self.version, self.projection
            ),
            _ => format!(
                "dropped version {} of `{}`: its tables, checkpoints and parked streams\n",
                self.version, self.projection
            ),
        }
    }
}

pub(crate) async fn run_versions(store: &Store, name: &str, json: bool) -> Result<()> {
    output::emit(&versions(store, name).await?, json)
}

pub(crate) async fn run_rebuild(store: &Store, args: RebuildArgs, json: bool) -> Result<()> {
    output::emit(&rebuild(store, args, json).await?, json)
}

pub(crate) async fn run_promote(store: &Store, args: PromoteArgs, json: bool) -> Result<()> {
    if !args.yes {
        return Err(CliError::usage(format!(
            "promoting version {} of `{}` switches every reader to its tables: pass --yes to \
             do it",
            args.number, args.name
        )));
    }
    store
        .store
        .promote_registered(&args.name, args.number)
        .await?;
    output::emit(
        &ChangedReport {
            projection: args.name,
            version: args.number,
            action: "promoted",
        },
        json,
    )
}

pub(crate) async fn run_drop(store: &Store, args: DropVersionArgs, json: bool) -> Result<()> {
    if !args.yes {
        return Err(CliError::usage(format!(
            "dropping version {} of `{}` drops its tables: pass --yes to do it",
            args.number, args.name
        )));
    }
    if !store.store.drop_version(&args.name, args.number).await? {
        return Err(CliError::UnknownVersions {
            name: format!("{} (version {})", args.name, args.number),
            schema: store.schema.as_str().to_owned(),
        });
    }
    output::emit(
        &ChangedReport {
            projection: args.name,
            version: args.number,
            action: "dropped",
        },
        json,
    )
}
