//! Timing, concurrency and statistics.
//!
//! A measurement runs a fixed list of deposits per client. Clients are tokio tasks that
//! start together behind a barrier; each runs its deposits one after another, and runs a
//! deposit again when it reports a conflict (up to [`MAX_ATTEMPTS`] times). The latency
//! of a deposit is the time the client waited for it, retries included; throughput is
//! acknowledged deposits over the wall time from the barrier to the last client.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::future::try_join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};
use tokio::sync::Barrier;

use crate::bank::{AccountKey, Bank, CommandError};

/// How often a client runs a conflicting deposit before it gives up on it.
pub const MAX_ATTEMPTS: u32 = 1_000;

/// Hands out account keys that no earlier measurement used.
#[derive(Debug, Default)]
pub struct Keys(AtomicU64);

impl Keys {
    /// `n` fresh keys.
    pub fn take(&self, n: usize) -> Vec<AccountKey> {
        let n = n as u64;
        let first = self.0.fetch_add(n, Ordering::Relaxed) + 1;
        (first..first + n).collect()
    }
}

/// One deposit of a plan.
#[derive(Clone, Copy, Debug)]
pub struct Op {
    /// The account.
    pub account: AccountKey,
    /// The amount, unique within a plan when deposits are checked one by one.
    pub amount: i64,
}

/// What one measurement saw.
#[derive(Debug, Default)]
pub struct RunStats {
    /// From the start barrier to the last client's last deposit.
    pub wall: Duration,
    /// Per acknowledged deposit, sorted.
    pub latencies: Vec<Duration>,
    /// Conflicts the harness retried.
    pub retries: u64,
    /// Conflicts the framework retried by itself.
    pub internal_conflicts: u64,
    /// Deposits abandoned after [`MAX_ATTEMPTS`] conflicts.
    pub gave_up: u64,
    /// The deposits the framework acknowledged.
    pub acked: Vec<Op>,
}

impl RunStats {
    /// Acknowledged deposits per second.
    pub fn throughput(&self) -> f64 {
        self.acked.len() as f64 / self.wall.as_secs_f64()
    }

    /// The `q` quantile (nearest rank) of the latencies, in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        quantile(&self.latencies, q).as_secs_f64() * 1e3
    }

    /// All conflicts, seen by the harness or retried inside the framework.
    pub fn conflicts(&self) -> u64 {
        self.retries + self.internal_conflicts
    }
}

/// Runs `plan` (one list of deposits per client) against `bank`.
///
/// # Errors
///
/// Fails on the first deposit that fails for a reason other than a conflict.
pub async fn run(bank: Arc<dyn Bank>, plan: Vec<Vec<Op>>) -> Result<RunStats> {
    let before = bank.internal_conflicts();
    let barrier = Arc::new(Barrier::new(plan.len() + 1));
    let tasks: Vec<_> = plan
        .into_iter()
        .map(|ops| {
            let bank = Arc::clone(&bank);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                client(&*bank, ops).await
            })
        })
        .collect();
    barrier.wait().await;
    let start = Instant::now();
    let mut stats = RunStats::default();
    for task in tasks {
        let client = task.await.context("client task panicked")??;
        stats.latencies.extend(client.latencies);
        stats.retries += client.retries;
        stats.gave_up += client.gave_up;
        stats.acked.extend(client.acked);
    }
    stats.wall = start.elapsed();
    stats.latencies.sort_unstable();
    stats.internal_conflicts = bank.internal_conflicts() - before;
    Ok(stats)
}

async fn client(bank: &dyn Bank, ops: Vec<Op>) -> Result<RunStats> {
    let mut stats = RunStats {
        latencies: Vec::with_capacity(ops.len()),
        acked: Vec::with_capacity(ops.len()),
        ..RunStats::default()
    };
    for op in ops {
        let start = Instant::now();
        let mut attempt = 1;
        loop {
            match bank.deposit(op.account, op.amount).await {
                Ok(()) => {
                    stats.latencies.push(start.elapsed());
                    stats.acked.push(op);
                    break;
                }
                Err(CommandError::Conflict) if attempt < MAX_ATTEMPTS => {
                    stats.retries += 1;
                    attempt += 1;
                }
                Err(CommandError::Conflict) => {
                    stats.retries += 1;
                    stats.gave_up += 1;
                    break;
                }
                Err(CommandError::Other(err)) => {
                    return Err(err.context(format!("deposit into account {}", op.account)));
                }
            }
        }
    }
    Ok(stats)
}

/// Opens `account`, running the command again on conflicts.
///
/// # Errors
///
/// Fails when the account cannot be opened.
pub async fn open(bank: &dyn Bank, account: AccountKey) -> Result<()> {
    let mut attempt = 1;
    loop {
        match bank.open(account).await {
            Ok(()) => return Ok(()),
            Err(CommandError::Conflict) if attempt < MAX_ATTEMPTS => attempt += 1,
            Err(err) => {
                return Err(anyhow::Error::from(err).context(format!("opening account {account}")))
            }
        }
    }
}

/// Opens `accounts` with `workers` concurrent clients (which also warms the pool's
/// connections and their prepared statements).
///
/// # Errors
///
/// Fails when an account cannot be opened.
pub async fn open_accounts(
    bank: &Arc<dyn Bank>,
    accounts: &[AccountKey],
    workers: usize,
) -> Result<()> {
    let chunk = accounts.len().div_ceil(workers.max(1)).max(1);
    try_join_all(accounts.chunks(chunk).map(|keys| {
        let bank = Arc::clone(bank);
        let keys = keys.to_vec();
        async move {
            for key in keys {
                open(&*bank, key).await?;
            }
            anyhow::Ok(())
        }
    }))
    .await?;
    Ok(())
}

/// What a check of the stored deposits found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// Acknowledged deposits that are not stored.
    pub lost: u64,
    /// Extra copies of stored deposits (stored more than once, or stored but not
    /// acknowledged).
    pub doubled: u64,
    /// Accounts whose loaded balance differs from the acknowledged deposits.
    pub wrong_balances: u64,
}

impl std::ops::AddAssign for Audit {
    fn add_assign(&mut self, other: Audit) {
        self.lost += other.lost;
        self.doubled += other.doubled;
        self.wrong_balances += other.wrong_balances;
    }
}

/// Compares what `bank` stored and loads with the acknowledged deposits.
///
/// With `by_event`, also reads each account's `Deposited` events and matches them to the
/// acknowledged deposits one by one (amounts must then be unique per account).
///
/// # Errors
///
/// Fails when the bank cannot load or read an account.
pub async fn audit(bank: &dyn Bank, acked: &[Op], by_event: bool) -> Result<Audit> {
    let mut per_account: HashMap<AccountKey, Vec<i64>> = HashMap::new();
    for op in acked {
        per_account.entry(op.account).or_default().push(op.amount);
    }
    let mut audit = Audit::default();
    for (account, amounts) in per_account {
        let loaded = bank.load(account).await?;
        let acked = amounts.len() as u64;
        if loaded.balance != amounts.iter().sum::<i64>() {
            audit.wrong_balances += 1;
        }
        if by_event {
            let mut expected: HashMap<i64, i64> = HashMap::new();
            for amount in amounts {
                *expected.entry(amount).or_default() += 1;
            }
            let mut stored: HashMap<i64, i64> = HashMap::new();
            for amount in bank.stored_deposits(account).await? {
                *stored.entry(amount).or_default() += 1;
            }
            for (amount, &want) in &expected {
                let have = stored.get(amount).copied().unwrap_or(0);
                audit.lost += u64::try_from(want - have).unwrap_or(0);
            }
            for (amount, &have) in &stored {
                let want = expected.get(amount).copied().unwrap_or(0);
                audit.doubled += u64::try_from(have - want).unwrap_or(0);
            }
        } else {
            let deposits = loaded.events.saturating_sub(1);
            audit.lost += acked.saturating_sub(deposits);
            audit.doubled += deposits.saturating_sub(acked);
        }
    }
    Ok(audit)
}

/// Times `f` `n` times and returns the durations, sorted.
///
/// # Errors
///
/// Fails when `f` fails.
pub async fn time_n<F, Fut, T>(n: usize, mut f: F) -> Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        f().await?;
        times.push(start.elapsed());
    }
    times.sort_unstable();
    Ok(times)
}

/// The `q` quantile (nearest rank) of sorted `values`; zero when empty.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `values` (mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// Connection options for `database` on the server of `url`.
///
/// # Errors
///
/// Fails when `url` is not a Postgres URL.
pub fn options(url: &str, database: &str) -> Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)?
        .database(database)
        .disable_statement_logging())
}

/// Drops and creates `database` (a trusted, constant identifier) on the server of `url`.
///
/// # Errors
///
/// Fails when the server refuses.
pub async fn recreate_database(url: &str, database: &str) -> Result<()> {
    let mut admin = options(url, "postgres")?.connect().await?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)").as_str())
        .await?;
    admin
        .execute(format!("CREATE DATABASE \"{database}\"").as_str())
        .await?;
    Ok(())
}

/// A pool of up to `size` connections with `warm` of them opened up front.
///
/// # Errors
///
/// Fails when a connection cannot be opened.
pub async fn pool(options: PgConnectOptions, size: u32, warm: u32) -> Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(60))
        .connect_lazy_with(options);
    let conns = try_join_all((0..warm.min(size)).map(|_| pool.acquire())).await?;
    drop(conns);
    Ok(pool)
}
