//! What must hold once the stack has settled, and the report.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::{PgPool, Row as _};
use thalo::{EventEnvelope, EventStore as _, RawEvent};
use thalo_postgres::{checkpoint_key, PgEventStore};

use crate::client::{Answer, Command, Kind, Tally};
use crate::{Args, Faults};

/// The fold of the stored events: account -> (balance, version).
async fn folded(pool: &PgPool, schema: &str) -> anyhow::Result<HashMap<String, (i64, i64)>> {
    let rows = sqlx::query(&format!(
        "SELECT aggregate_id,
                sum(CASE event_type
                    WHEN 'AccountOpened' THEN (payload->>'initial_deposit')::bigint
                    WHEN 'FundsDeposited' THEN (payload->>'amount')::bigint
                    WHEN 'FundsWithdrawn' THEN -(payload->>'amount')::bigint
                    ELSE 0 END)::bigint,
                max(sequence)
         FROM \"{schema}\".events GROUP BY aggregate_id"
    ))
    .fetch_all(pool)
    .await
    .context("folding the events")?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

async fn read_model(pool: &PgPool, schema: &str) -> HashMap<String, (i64, i64)> {
    sqlx::query(&format!(
        "SELECT account_number, balance, version FROM \"{schema}\".bank_balances"
    ))
    .fetch_all(pool)
    .await
    .unwrap_or_default()
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2))))
    .collect()
}

async fn count(pool: &PgPool, schema: &str, table: &str) -> anyhow::Result<i64> {
    sqlx::query_scalar(&format!("SELECT count(*) FROM \"{schema}\".{table}"))
        .fetch_one(pool)
        .await
        .with_context(|| format!("counting {table}"))
}

/// The aggregate type the balances read model is built from.
const ACCOUNT: &str = "bank_account";

/// The service's store (`schema`, migrated by the service), for its events and its
/// projections' checkpoints.
fn store_in(pool: &PgPool, schema: &str) -> anyhow::Result<PgEventStore> {
    PgEventStore::builder(pool.clone())
        .schema(schema)
        .notify(false)
        .build()
        .context("the service's store")
}

/// The checkpoint key of the balances version that serves reads (`bank_balances`, or
/// `bank_balances@vN` once a version N > 1 is live).
async fn balances_key(store: &PgEventStore) -> anyhow::Result<String> {
    let live = store
        .live_version("bank_balances")
        .await
        .context("the live balances version")?;
    Ok(checkpoint_key("bank_balances", live.unwrap_or(1)).into_owned())
}

/// Waits until the balances have applied `events` (by their checkpoints): `Ok(false)`
/// when `bound` passed first or one of their streams is parked (the checks report
/// parking), with the reason on stderr.
async fn projected(
    store: &PgEventStore,
    events: &[EventEnvelope<RawEvent>],
    bound: Duration,
) -> anyhow::Result<bool> {
    let key = balances_key(store).await?;
    let result = store.wait_until_projected_by_key(&key, events, bound).await;
    waited(result, "waiting for the balances")
}

/// A wait's outcome: `Ok(false)` when it timed out or a stream is parked (the checks
/// report parking), with the reason on stderr.
fn waited(result: Result<(), thalo::Error>, what: &'static str) -> anyhow::Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(err @ (thalo::Error::Timeout { .. } | thalo::Error::Handler { .. })) => {
            eprintln!("  {err}");
            Ok(false)
        }
        Err(err) => Err(err).context(what),
    }
}

/// Waits until a write made after a fault shows in the read model (under load, that is
/// the whole pipeline working again: relay, broker, consumer): the first account event
/// the clients store from now on, applied by the balances (by their checkpoints).
/// Returns how long it took, or `None` after `bound`.
pub async fn wait_for_recovery(
    pool: &PgPool,
    schema: &str,
    bound: Duration,
) -> anyhow::Result<Option<Duration>> {
    let started = Instant::now();
    let store = store_in(pool, schema)?;
    let mut after: i64 = sqlx::query_scalar(&format!(
        "SELECT coalesce(max(position), 0)::int8 FROM \"{schema}\".events"
    ))
    .fetch_one(pool)
    .await
    .context("the last position")?;
    // The clients keep writing: the next account event (waiting for the clients, not
    // for the read model).
    let next = loop {
        let page = store
            .read_all(u64::try_from(after).unwrap_or(0), 100)
            .await
            .context("reading the events")?;
        if let Some(next) = page.iter().find(|e| e.aggregate_type == ACCOUNT) {
            break next.clone();
        }
        if let Some(last) = page.last() {
            after = i64::try_from(last.position).unwrap_or(i64::MAX);
        } else if started.elapsed() >= bound {
            return Ok(None);
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let left = bound.saturating_sub(started.elapsed());
    Ok(projected(&store, &[next], left)
        .await?
        .then(|| started.elapsed()))
}

/// Waits until the outbox is empty and the balances have applied every stored event,
/// then compares the read model with the fold of the events; false when `bound` passed
/// first, a stream is parked, or they differ.
pub async fn settle(pool: &PgPool, schema: &str, bound: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + bound;
    // The relay drains the outbox (not a read model: polled).
    while count(pool, schema, "outbox").await? != 0 {
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let store = store_in(pool, schema)?;
    let key = balances_key(&store).await?;
    let left = deadline.saturating_duration_since(Instant::now());
    let caught_up = store
        .wait_until_caught_up_by_key(&key, &[ACCOUNT], left)
        .await;
    if !waited(caught_up.map(drop), "waiting for the balances")? {
        return Ok(false);
    }
    Ok(read_model(pool, schema).await == folded(pool, schema).await?)
}

/// What the checks found.
#[derive(Debug, Default)]
pub struct Found {
    pub events: i64,
    pub lost: u64,
    pub applied_twice: u64,
    pub rejected_but_stored: u64,
    pub unexplained: u64,
    pub divergent_accounts: u64,
    pub outbox: i64,
    pub parked: i64,
    pub retried_commands: u64,
    pub violations: Vec<String>,
}

/// Checks the store and the read model against what the clients were told.
pub async fn check(
    pool: &PgPool,
    schema: &str,
    commands: &[Command],
    tally: &Tally,
) -> anyhow::Result<Found> {
    let mut found = Found::default();
    // Every stored event by the key of the command that stored it.
    let rows = sqlx::query(&format!(
        "SELECT metadata->>'command_id', event_id::text FROM \"{schema}\".events"
    ))
    .fetch_all(pool)
    .await
    .context("reading the events")?;
    found.events = rows.len() as i64;
    let mut by_key: HashMap<Option<String>, Vec<String>> = HashMap::new();
    for row in &rows {
        by_key
            .entry(row.get::<Option<String>, _>(0))
            .or_default()
            .push(row.get(1));
    }
    // The accounts were opened by the harness before the load, with keys too.
    let mut expected_balance: HashMap<&str, i64> = HashMap::new();
    for command in commands {
        if command.attempts > 1 {
            found.retried_commands += 1;
        }
        let stored = by_key
            .remove(&Some(command.key.clone()))
            .unwrap_or_default();
        match &command.answer {
            Answer::Acknowledged { event_id } => {
                match stored.as_slice() {
                    [] => {
                        found.lost += 1;
                        found
                            .violations
                            .push(format!("acknowledged but not stored: {command:?}"));
                    }
                    [one] if one == event_id => {}
                    [one] => found.violations.push(format!(
                        "acknowledged with event {event_id}, stored as {one}: {command:?}"
                    )),
                    more => {
                        found.applied_twice += 1;
                        found
                            .violations
                            .push(format!("stored {} times: {command:?}", more.len()));
                    }
                }
                let delta = match command.kind {
                    Kind::Withdraw => -command.amount,
                    Kind::Open | Kind::Deposit => command.amount,
                };
                *expected_balance.entry(&command.account).or_default() += delta;
            }
            Answer::Rejected { status, code } => {
                if !stored.is_empty() {
                    found.rejected_but_stored += 1;
                    found.violations.push(format!(
                        "rejected ({status} {code}) but stored: {command:?}"
                    ));
                }
                if code != "INSUFFICIENT_FUNDS" {
                    found
                        .violations
                        .push(format!("unexpected rejection {status} {code}: {command:?}"));
                }
            }
        }
    }
    // Events no client command accounts for.
    for (key, events) in by_key {
        found.unexplained += events.len() as u64;
        found.violations.push(format!(
            "{} stored event(s) of no client command (key {key:?})",
            events.len()
        ));
    }

    let fold = folded(pool, schema).await?;
    let model = read_model(pool, schema).await;
    for (account, (balance, version)) in &fold {
        let told = expected_balance.get(account.as_str()).copied().unwrap_or(0);
        if *balance != told {
            found.violations.push(format!(
                "{account}: the events add up to {balance}, the clients were told {told}"
            ));
        }
        if model.get(account) != Some(&(*balance, *version)) {
            found.divergent_accounts += 1;
            found.violations.push(format!(
                "{account}: read model {:?}, fold of the events {:?}",
                model.get(account),
                (balance, version)
            ));
        }
    }
    found.outbox = count(pool, schema, "outbox").await?;
    if found.outbox != 0 {
        found
            .violations
            .push(format!("{} rows left in the outbox", found.outbox));
    }
    found.parked = count(pool, schema, "outbox_parked").await?
        + count(pool, schema, "consumer_parked").await?;
    if found.parked != 0 {
        found
            .violations
            .push(format!("{} parked aggregates", found.parked));
    }
    if tally.acknowledged() == 0 {
        found
            .violations
            .push("no command was acknowledged".to_owned());
    }
    Ok(found)
}

/// The figures, as Markdown.
pub fn report(
    faults: &Faults,
    tally: &Tally,
    found: &Found,
    load: Duration,
    settle: Duration,
    settled: bool,
    args: &Args,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "### Fault run: {} s, {} clients ({} ms between commands), {} accounts, a fault every {} s",
        args.seconds, args.clients, args.think_ms, args.accounts, args.fault_every
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "| figure | value |");
    let _ = writeln!(out, "|---|---:|");
    let rows: [(&str, String); 18] = [
        (
            "service SIGKILLed and restarted",
            faults.service_kills.to_string(),
        ),
        (
            "Postgres session terminations (sessions terminated)",
            format!(
                "{} ({})",
                faults.session_terminations, faults.sessions_terminated
            ),
        ),
        (
            &if args.brokers.is_some() {
                "broker restarts (--broker-restart-command)".to_owned()
            } else if args.broker_fault == "freeze" {
                "broker frozen for 3 s (SIGSTOP, then SIGCONT)".to_owned()
            } else if args.broker_fault == "none" {
                "broker faults (none: --broker-fault none)".to_owned()
            } else {
                format!(
                    "broker restarts ({}, sqlite storage)",
                    if args.kill_broker {
                        "SIGKILL"
                    } else {
                        "SIGTERM"
                    }
                )
            },
            faults.broker_restarts.to_string(),
        ),
        (
            "slowest recovery after a fault (a later write in the read model)",
            if faults.unrecovered == 0 {
                format!("{:.1} s", faults.slowest_recovery.as_secs_f64())
            } else {
                format!("{} fault(s) not recovered within 30 s", faults.unrecovered)
            },
        ),
        ("commands sent", tally.sent().to_string()),
        ("acknowledged (2xx)", tally.acknowledged().to_string()),
        (
            "rejected (422 INSUFFICIENT_FUNDS)",
            tally.rejected().to_string(),
        ),
        (
            "ambiguous attempts retried with the same key",
            tally.retries().to_string(),
        ),
        (
            "commands that needed a retry",
            found.retried_commands.to_string(),
        ),
        (
            "answers replayed from the idempotency record",
            tally.replayed().to_string(),
        ),
        ("events stored", found.events.to_string()),
        ("acknowledged but lost", found.lost.to_string()),
        ("applied twice", found.applied_twice.to_string()),
        ("rejected but stored", found.rejected_but_stored.to_string()),
        (
            "read-model divergences (accounts)",
            found.divergent_accounts.to_string(),
        ),
        (
            "outbox rows left / parked aggregates",
            format!("{} / {}", found.outbox, found.parked),
        ),
        ("load time", format!("{:.1} s", load.as_secs_f64())),
        (
            "time to settle after the load",
            if settled {
                format!("{:.1} s", settle.as_secs_f64())
            } else {
                format!("did not settle within {:.0} s", settle.as_secs_f64())
            },
        ),
    ];
    for (name, value) in rows {
        let _ = writeln!(out, "| {name} | {value} |");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{}",
        if found.violations.is_empty() && settled {
            "All checks passed."
        } else {
            "CHECKS FAILED."
        }
    );
    out
}
