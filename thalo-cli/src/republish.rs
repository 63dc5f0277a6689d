//! `thalo republish`: stored events back into the outbox.
//!
//! The tool does not publish anything itself. It inserts outbox rows, exactly as an
//! append does (`outbox (position)`, in position order), and wakes the relay, so the
//! running relay publishes them with everything it guarantees: one leader at a time,
//! fenced by its epoch, in order per aggregate, the topic naming and message format it
//! is configured with. Consumers drop events whose sequence they applied already, so
//! republishing is safe for them; a new consumer group, a projection being rebuilt, or
//! a topic that lost events to retention gets them.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use sqlx::Row;

use crate::args::RepublishArgs;
use crate::error::{CliError, Result};
use crate::output::{self, Report};
use crate::store::Store;

#[derive(Debug, Serialize)]
struct RepublishReport {
    /// The range asked for (inclusive).
    from: u64,
    to: u64,
    aggregate_type: Option<String>,
    /// Events in the range (outbox rows inserted, unless a dry run).
    events: u64,
    /// The first and last position republished.
    first_position: Option<u64>,
    last_position: Option<u64>,
    batches: u64,
    seconds: f64,
    dry_run: bool,
}

impl Report for RepublishReport {
    fn text(&self) -> String {
        let only = self
            .aggregate_type
            .as_deref()
            .map(|t| format!(" of {t}"))
            .unwrap_or_default();
        if self.dry_run {
            return format!(
                "dry run: {} events{only} in positions {}..={} would be republished\n",
                self.events, self.from, self.to
            );
        }
        if self.events == 0 && self.from > self.to {
            return format!(
                "nothing to republish: the store's head is position {}\n",
                self.to
            );
        }
        if self.events == 0 {
            return format!(
                "nothing to republish: no events{only} in positions {}..={}\n",
                self.from, self.to
            );
        }
        let rate = if self.seconds > 0.0 {
            format!(", {:.0} events/s", self.events as f64 / self.seconds)
        } else {
            String::new()
        };
        format!(
            "republished {}{only} (positions {}..={}) into the outbox in {}, {:.1}s{rate}; \
             the relay publishes them next\n",
            output::count(self.events, "event", "events"),
            self.first_position.unwrap_or(self.from),
            self.last_position.unwrap_or(self.to),
            output::count(self.batches, "batch", "batches"),
            self.seconds
        )
    }
}

pub(crate) async fn run(store: &Store, args: RepublishArgs, json: bool) -> Result<()> {
    let to = match args.to {
        Some(to) => to,
        // The head now: events appended from here on have outbox rows of their own.
        None => store.head().await?,
    };
    if args.to.is_some() && args.from > to {
        return Err(CliError::usage(format!(
            "--from {} is after --to {to}",
            args.from
        )));
    }
    let from_i = to_i64(args.from)?;
    let to_i = to_i64(to)?;
    let row = sqlx::query(&store.sql.republish_count)
        .bind(from_i)
        .bind(to_i)
        .bind(args.aggregate_type.as_deref())
        .fetch_one(&store.pool)
        .await
        .map_err(CliError::sql("counting the events to republish"))?;
    let decode = || -> Result<(i64, Option<i64>, Option<i64>), sqlx::Error> {
        Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
    };
    let (total, first, last) = decode().map_err(CliError::sql("counting the events"))?;
    let total = u64::try_from(total).unwrap_or(0);
    let mut report = RepublishReport {
        from: args.from,
        to,
        aggregate_type: args.aggregate_type.clone(),
        events: total,
        first_position: first.and_then(|p| u64::try_from(p).ok()),
        last_position: last.and_then(|p| u64::try_from(p).ok()),
        batches: 0,
        seconds: 0.0,
        dry_run: args.dry_run,
    };
    if args.dry_run || total == 0 {
        return output::emit(&report, json);
    }

    let progress = progress_bar(total, json);
    let started = Instant::now();
    let batch_size = to_i64(args.batch_size)?;
    // Exclusive cursor: the last position republished.
    let mut after = from_i - 1;
    let mut inserted = 0u64;
    loop {
        let row = sqlx::query(&store.sql.republish_batch)
            .bind(after)
            .bind(to_i)
            .bind(args.aggregate_type.as_deref())
            .bind(batch_size)
            .fetch_one(&store.pool)
            .await
            .map_err(CliError::sql("inserting outbox rows"))?;
        let decode = || -> Result<(i64, Option<i64>), sqlx::Error> {
            Ok((row.try_get(0)?, row.try_get(1)?))
        };
        let (count, last) = decode().map_err(CliError::sql("inserting outbox rows"))?;
        let Some(last) = last else { break };
        let count = u64::try_from(count).unwrap_or(0);
        inserted += count;
        report.batches += 1;
        progress.inc(count);
        after = last;
        // Each batch is committed: let the relay start on it while the next is written.
        wake(store).await;
        if count < args.batch_size {
            break;
        }
    }
    progress.finish_and_clear();
    report.events = inserted;
    report.seconds = started.elapsed().as_secs_f64();
    output::emit(&report, json)
}

/// A progress bar on standard error with rate and ETA (hidden with `--json`, and when
/// standard error is not a terminal).
fn progress_bar(total: u64, json: bool) -> ProgressBar {
    let progress = ProgressBar::with_draw_target(
        Some(total),
        if json {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} events \
         ({per_sec}, ETA {eta})",
    ) {
        progress.set_style(style);
    }
    progress.enable_steady_tick(Duration::from_millis(200));
    progress
}

/// Notifies the store's channel, which the relay listens on. A lost notification only
/// costs the relay's poll interval.
async fn wake(store: &Store) {
    let _ = sqlx::query(store.sql.wake)
        .bind(store.schema.channel())
        .execute(&store.pool)
        .await;
}

fn to_i64(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| CliError::usage(format!("{n} is out of range")))
}
