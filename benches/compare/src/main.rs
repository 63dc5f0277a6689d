//! Side-by-side benchmark of Thalo and its Rust peers on one workload: a bank account
//! with `Opened` and `Deposited` events and a deposit command (load the account, check
//! that it is open and the amount positive, append one event), on Postgres.
//!
//! ```text
//! cargo run --release --manifest-path benches/compare/Cargo.toml -- [--rounds N] [--quick] [--out PATH]
//! ```
//!
//! Contenders: Thalo (`Repository::execute` on `PgEventStore`, notify after commit and in tx),
//! `cqrs-es` + `postgres-es`, `esrs`, `disintegrate` + `disintegrate-postgres`, and raw
//! sqlx doing the same SQL work by hand (the physical limit). Each gets its own database,
//! dropped and created at start. Every table is measured in this one process: a warm-up
//! round, then `--rounds` rounds (default 5) in which the contenders take turns (in a
//! rotated order) on each scenario; the tables show the median over the rounds and the
//! ratio to Thalo. Results go to stdout and to `RESULTS.md` beside this crate.
//!
//! Run by hand, never in CI or `cargo test`. `DATABASE_URL` names the server (default
//! `postgres://postgres@127.0.0.1:5432/thalo_test`; only its host, port and credentials
//! are used).

mod bank;
mod cqrs_es;
mod disintegrate;
mod esrs;
mod harness;
mod raw;
mod thalo;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use sqlx::{ConnectOptions, Connection};

use crate::bank::{AccountKey, Framework};
use crate::harness::{Audit, Keys, Op};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/thalo_test";

/// Events appended per seeding command when building the long stream.
const SEED_CHUNK: usize = 500;

struct Config {
    rounds: usize,
    quick: bool,
    out: PathBuf,
    url: String,
    args: Vec<String>,
}

impl Config {
    fn from_args() -> Result<Config> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut config = Config {
            rounds: 5,
            quick: false,
            out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md")),
            url: std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned()),
            args: args.clone(),
        };
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--rounds" => {
                    config.rounds = it.next().context("--rounds needs a value")?.parse()?;
                    ensure!(config.rounds > 0, "--rounds must be at least 1");
                }
                "--quick" => config.quick = true,
                "--out" => config.out = it.next().context("--out needs a path")?.into(),
                "-h" | "--help" => {
                    println!(
                        "cargo run --release --manifest-path benches/compare/Cargo.toml -- [--rounds N] [--quick] [--out PATH]"
                    );
                    std::process::exit(0);
                }
                other => bail!("unknown argument `{other}` (try --help)"),
            }
        }
        Ok(config)
    }
}

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    /// `clients` clients, each on accounts of its own.
    Distinct { clients: usize },
    /// `clients` clients all depositing into one account.
    Contended { clients: usize },
    /// Rebuilding an account from a long stream.
    Load,
}

/// Workload sizes.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    /// Accounts each client owns, by number of clients. Each account gets
    /// `deposits_per_account` deposits, round-robin, so streams stay short (a realistic
    /// aggregate, and no drift from replaying ever longer streams during a run).
    accounts_per_client: [(usize, usize); 3],
    deposits_per_account: usize,
    /// Deposits per client in the contended scenario.
    contended_per_client: usize,
    /// Events in the long stream (including `Opened`).
    load_events: usize,
    /// Timed loads per round.
    load_repeats: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                accounts_per_client: [(1, 20), (8, 5), (32, 2)],
                deposits_per_account: 5,
                contended_per_client: 10,
                load_events: 1_000,
                load_repeats: 2,
            }
        } else {
            Sizes {
                accounts_per_client: [(1, 100), (8, 25), (32, 10)],
                deposits_per_account: 10,
                contended_per_client: 50,
                load_events: 10_000,
                load_repeats: 5,
            }
        }
    }

    fn warm_up(self) -> Sizes {
        Sizes {
            accounts_per_client: self.accounts_per_client.map(|(c, a)| (c, a.div_ceil(4))),
            contended_per_client: self.contended_per_client.div_ceil(4),
            load_repeats: 1,
            ..self
        }
    }

    fn accounts_for(&self, clients: usize) -> usize {
        self.accounts_per_client
            .iter()
            .find(|(c, _)| *c == clients)
            .map_or(1, |(_, a)| *a)
    }
}

/// One measurement of one contender.
#[derive(Clone, Debug, Default)]
struct Sample {
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    deposits: u64,
    conflicts: u64,
    gave_up: u64,
    audit: Audit,
    load_ms: f64,
}

struct Bench {
    config: Config,
    frameworks: Vec<Box<dyn Framework>>,
    keys: Keys,
    /// Per framework, the account with the long stream.
    long: Vec<AccountKey>,
    samples: BTreeMap<(Scenario, usize), Vec<Sample>>,
    /// Failed measurements: how many of the measured rounds failed, and the first error.
    errors: BTreeMap<(Scenario, usize), (usize, String)>,
}

impl Bench {
    async fn pool(&self, fw: &dyn Framework, size: u32, warm: u32) -> Result<sqlx::PgPool> {
        harness::pool(
            harness::options(&self.config.url, fw.database())?,
            size,
            warm,
        )
        .await
    }

    /// Fresh databases, schemas, and the long stream for the load benchmark.
    async fn setup(&mut self, sizes: Sizes) -> Result<()> {
        for fw in &self.frameworks {
            eprintln!("setting up {} in database {}", fw.name(), fw.database());
            harness::recreate_database(&self.config.url, fw.database()).await?;
            let pool = self.pool(&**fw, 4, 1).await?;
            fw.setup(&pool)
                .await
                .with_context(|| format!("setting up {}", fw.name()))?;
            let bank = fw.bind(pool.clone()).await?;
            let key = self.keys.take(1)[0];
            harness::open(&*bank, key).await?;
            let amounts: Vec<i64> = (1..sizes.load_events as i64).collect();
            for chunk in amounts.chunks(SEED_CHUNK) {
                bank.seed(key, chunk.to_vec())
                    .await
                    .with_context(|| format!("seeding the long stream of {}", fw.name()))?;
            }
            let loaded = bank.load(key).await?;
            ensure!(
                loaded.events == sizes.load_events as u64
                    && loaded.balance == amounts.iter().sum::<i64>(),
                "{}: the seeded stream loads as {loaded:?}",
                fw.name()
            );
            pool.close().await;
            self.long.push(key);
        }
        Ok(())
    }

    async fn measure(
        &self,
        fw: &dyn Framework,
        index: usize,
        scenario: Scenario,
        sizes: Sizes,
    ) -> Result<Sample> {
        match scenario {
            Scenario::Distinct { clients } => {
                let per_client = sizes.accounts_for(clients);
                let size = fw.pool_size(clients);
                let pool = self.pool(fw, size, size.min(clients as u32 + 1)).await?;
                let bank = fw.bind(pool.clone()).await?;
                let accounts = self.keys.take(clients * per_client);
                harness::open_accounts(&bank, &accounts, clients).await?;
                let plan = accounts
                    .chunks(per_client)
                    .map(|mine| {
                        (0..sizes.deposits_per_account)
                            .flat_map(|_| mine.iter().map(|&account| Op { account, amount: 1 }))
                            .collect()
                    })
                    .collect();
                let stats = harness::run(Arc::clone(&bank), plan).await?;
                let audit = harness::audit(&*bank, &stats.acked, false).await?;
                pool.close().await;
                Ok(sample(&stats, audit))
            }
            Scenario::Contended { clients } => {
                let size = fw.pool_size(clients);
                let pool = self.pool(fw, size, size.min(clients as u32 + 1)).await?;
                let bank = fw.bind(pool.clone()).await?;
                let account = self.keys.take(1)[0];
                harness::open(&*bank, account).await?;
                let per_client = sizes.contended_per_client;
                // Unique amounts, so that every stored deposit can be matched to the
                // command that made it.
                let plan = (0..clients)
                    .map(|c| {
                        (0..per_client)
                            .map(|i| Op {
                                account,
                                amount: (c * per_client + i + 1) as i64,
                            })
                            .collect()
                    })
                    .collect();
                let stats = harness::run(Arc::clone(&bank), plan).await?;
                let audit = harness::audit(&*bank, &stats.acked, true).await?;
                pool.close().await;
                Ok(sample(&stats, audit))
            }
            Scenario::Load => {
                let pool = self.pool(fw, 2, 1).await?;
                let bank = fw.bind(pool.clone()).await?;
                let key = self.long[index];
                let expected = sizes.load_events as u64;
                let first = bank.load(key).await?;
                ensure!(
                    first.events == expected,
                    "loaded {first:?}, expected {expected} events"
                );
                let times = harness::time_n(sizes.load_repeats, || bank.load(key)).await?;
                pool.close().await;
                Ok(Sample {
                    load_ms: harness::quantile(&times, 0.5).as_secs_f64() * 1e3,
                    ..Sample::default()
                })
            }
        }
    }

    async fn round(&mut self, round: usize, sizes: Sizes, record: bool) {
        let scenarios = [
            Scenario::Distinct { clients: 1 },
            Scenario::Distinct { clients: 8 },
            Scenario::Distinct { clients: 32 },
            Scenario::Contended { clients: 8 },
            Scenario::Load,
        ];
        let n = self.frameworks.len();
        for scenario in scenarios {
            for turn in 0..n {
                // Rotate who goes first, so no contender always runs on a cooler or
                // warmer server.
                let index = (turn + round) % n;
                let fw = &*self.frameworks[index];
                let label = if record {
                    format!("round {round}")
                } else {
                    "warm-up".to_owned()
                };
                match self.measure(fw, index, scenario, sizes).await {
                    Ok(s) => {
                        eprintln!(
                            "{label} {scenario:?} {}: {:.0} cmd/s, p50 {:.2} ms, p99 {:.2} ms, \
                             {} conflicts, load {:.1} ms, {:?}",
                            fw.name(),
                            s.throughput,
                            s.p50_ms,
                            s.p99_ms,
                            s.conflicts,
                            s.load_ms,
                            s.audit
                        );
                        if record {
                            self.samples.entry((scenario, index)).or_default().push(s);
                        }
                    }
                    Err(err) => {
                        eprintln!("{label} {scenario:?} {}: error: {err:#}", fw.name());
                        let entry = self
                            .errors
                            .entry((scenario, index))
                            .or_insert_with(|| (0, format!("{label}: {err:#}")));
                        entry.0 += usize::from(record);
                    }
                }
                // Let the server settle (checkpoints, autovacuum of the last run).
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn sample(stats: &harness::RunStats, audit: Audit) -> Sample {
    Sample {
        throughput: stats.throughput(),
        p50_ms: stats.latency_ms(0.50),
        p99_ms: stats.latency_ms(0.99),
        deposits: stats.acked.len() as u64,
        conflicts: stats.conflicts(),
        gave_up: stats.gave_up,
        audit,
        load_ms: 0.0,
    }
}

/// Medians over the rounds of one contender in one scenario.
#[derive(Clone, Copy, Debug)]
struct Summary {
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    load_ms: f64,
    conflicts_per_deposit: f64,
    gave_up: u64,
    audit: Audit,
}

fn summarize(samples: &[Sample]) -> Summary {
    let med = |f: fn(&Sample) -> f64| harness::median(&samples.iter().map(f).collect::<Vec<_>>());
    let mut audit = Audit::default();
    for s in samples {
        audit += s.audit;
    }
    let deposits: u64 = samples.iter().map(|s| s.deposits).sum();
    let conflicts: u64 = samples.iter().map(|s| s.conflicts).sum();
    Summary {
        throughput: med(|s| s.throughput),
        p50_ms: med(|s| s.p50_ms),
        p99_ms: med(|s| s.p99_ms),
        load_ms: med(|s| s.load_ms),
        conflicts_per_deposit: if deposits == 0 {
            0.0
        } else {
            conflicts as f64 / deposits as f64
        },
        gave_up: samples.iter().map(|s| s.gave_up).sum(),
        audit,
    }
}

fn ratio(value: f64, base: f64) -> String {
    if base > 0.0 && value.is_finite() {
        format!("{:.2}×", value / base)
    } else {
        "–".to_owned()
    }
}

impl Bench {
    fn summary(&self, scenario: Scenario, index: usize) -> Option<Summary> {
        self.samples
            .get(&(scenario, index))
            .filter(|s| !s.is_empty())
            .map(|s| summarize(s))
    }

    /// The contender's name, with the number of rounds behind its medians when some
    /// failed.
    fn label(&self, scenario: Scenario, index: usize) -> String {
        let name = self.frameworks[index].name();
        let n = self.samples.get(&(scenario, index)).map_or(0, Vec::len);
        if n < self.config.rounds {
            format!("{name} ({n} of {} rounds)", self.config.rounds)
        } else {
            name.to_owned()
        }
    }

    fn missing(&self, out: &mut String, scenario: Scenario, index: usize) {
        let fw = &self.frameworks[index];
        let why = self
            .errors
            .get(&(scenario, index))
            .map_or("no result".to_owned(), |(_, e)| {
                e.replace('|', "/").replace('\n', " ")
            });
        let _ = writeln!(out, "| {} | failed: {why} |", fw.name());
    }

    fn throughput_table(
        &self,
        out: &mut String,
        scenario: Scenario,
        title: &str,
        contention: bool,
    ) {
        let base = self.summary(scenario, 0);
        let _ = writeln!(out, "### {title}\n");
        if contention {
            let _ = writeln!(
                out,
                "| framework | outbox | deposits/s | vs Thalo | p50 ms | p99 ms | p50 vs Thalo \
                 | conflicts per deposit | gave up | lost | doubled | wrong balance |"
            );
            let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        } else {
            let _ = writeln!(
                out,
                "| framework | outbox | deposits/s | vs Thalo | p50 ms | p99 ms | p50 vs Thalo \
                 | conflicts per deposit | lost or doubled |"
            );
            let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
        }
        for (index, fw) in self.frameworks.iter().enumerate() {
            let Some(s) = self.summary(scenario, index) else {
                self.missing(out, scenario, index);
                continue;
            };
            let (bt, bp) = base.map_or((0.0, 0.0), |b| (b.throughput, b.p50_ms));
            let _ = write!(
                out,
                "| {} | {} | {:.0} | {} | {:.2} | {:.2} | {} |",
                self.label(scenario, index),
                if fw.writes_outbox() { "yes" } else { "no" },
                s.throughput,
                ratio(s.throughput, bt),
                s.p50_ms,
                s.p99_ms,
                ratio(s.p50_ms, bp),
            );
            if contention {
                let _ = write!(
                    out,
                    " {:.2} | {} | {} | {} | {} |",
                    s.conflicts_per_deposit,
                    s.gave_up,
                    s.audit.lost,
                    s.audit.doubled,
                    s.audit.wrong_balances
                );
            } else {
                let _ = write!(
                    out,
                    " {:.3} | {} |",
                    s.conflicts_per_deposit,
                    s.audit.lost + s.audit.doubled + s.audit.wrong_balances
                );
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out);
    }

    fn load_table(&self, out: &mut String, events: usize) {
        let base = self.summary(Scenario::Load, 0);
        let _ = writeln!(out, "### Load one account with {events} events\n");
        let _ = writeln!(
            out,
            "| framework | load ms (median) | vs Thalo | events/s |"
        );
        let _ = writeln!(out, "|---|--:|--:|--:|");
        for index in 0..self.frameworks.len() {
            let Some(s) = self.summary(Scenario::Load, index) else {
                self.missing(out, Scenario::Load, index);
                continue;
            };
            let _ = writeln!(
                out,
                "| {} | {:.1} | {} | {:.0} |",
                self.label(Scenario::Load, index),
                s.load_ms,
                ratio(s.load_ms, base.map_or(0.0, |b| b.load_ms)),
                events as f64 / (s.load_ms / 1e3)
            );
        }
        let _ = writeln!(out);
    }

    fn tables(&self, sizes: Sizes) -> String {
        let mut out = String::new();
        for (clients, accounts) in sizes.accounts_per_client {
            let title = format!(
                "{clients} client{}, distinct accounts ({} deposits per round: {accounts} \
                 account{} per client, {} deposits each)",
                if clients == 1 { "" } else { "s" },
                clients * accounts * sizes.deposits_per_account,
                if accounts == 1 { "" } else { "s" },
                sizes.deposits_per_account
            );
            self.throughput_table(&mut out, Scenario::Distinct { clients }, &title, false);
        }
        let title = format!(
            "8 clients, one account (contention; {} deposits per round)",
            8 * sizes.contended_per_client
        );
        self.throughput_table(&mut out, Scenario::Contended { clients: 8 }, &title, true);
        self.load_table(&mut out, sizes.load_events);
        let rounds = self
            .samples
            .values()
            .map(Vec::len)
            .max()
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "Medians over {rounds} rounds; \"vs Thalo\" divides by the `thalo` row (deposits/s: \
             above 1 is faster than Thalo; latency: above 1 is slower). Lost, doubled and \
             wrong-balance counts are totals over all rounds."
        );
        if !self.errors.is_empty() {
            let _ = writeln!(out, "\nFailed measurements (left out of the medians):\n");
            for ((scenario, index), (count, first)) in &self.errors {
                let _ = writeln!(
                    out,
                    "- {}, {scenario:?}: {count} of {} measured rounds failed; first error: {first}",
                    self.frameworks[*index].name(),
                    self.config.rounds
                );
            }
        }
        out
    }
}

/// Machine and software facts for the report.
async fn environment(url: &str) -> Result<String> {
    let mut out = String::new();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or("unknown".to_owned(), |kb| {
            format!("{:.1} GiB", kb / 1024.0 / 1024.0)
        });
    let mut conn = harness::options(url, "postgres")?.connect().await?;
    let pg: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut conn)
        .await?;
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting FROM pg_settings WHERE name IN \
         ('max_connections', 'shared_buffers', 'synchronous_commit', 'fsync') ORDER BY name",
    )
    .fetch_all(&mut conn)
    .await?;
    let now: String =
        sqlx::query_scalar("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI UTC')")
            .fetch_one(&mut conn)
            .await?;
    conn.close().await?;
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let _ = writeln!(out, "- date: {now}");
    let _ = writeln!(out, "- `nproc`: {cpus} ({cpu})");
    let _ = writeln!(out, "- memory: {memory}");
    let _ = writeln!(out, "- PostgreSQL: {pg}, on the same machine (loopback)");
    let settings: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(out, "- PostgreSQL settings: {}", settings.join(", "));
    let _ = writeln!(
        out,
        "- Rust: {rustc}, release profile; tokio multi-thread runtime, 2 workers"
    );
    let _ = writeln!(out, "- crates: {}", crate_versions().join(", "));
    Ok(out)
}

/// `/proc/loadavg`'s first three fields: other work on the machine skews the numbers.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or("unknown".to_owned(), |s| {
        s.split_whitespace().take(3).collect::<Vec<_>>().join(", ")
    })
}

/// Versions of the contenders' crates, from the workspace's `Cargo.lock`.
fn crate_versions() -> Vec<String> {
    const NAMES: [&str; 6] = [
        "cqrs-es",
        "postgres-es",
        "esrs",
        "disintegrate",
        "disintegrate-postgres",
        "sqlx",
    ];
    let lock = [
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .unwrap_or_default();
    let mut found = vec!["thalo 0.9.0 (this workspace)".to_owned()];
    let mut name = "";
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = \"") {
            name = n.trim_end_matches('"');
        } else if let Some(v) = line.strip_prefix("version = \"") {
            if NAMES.contains(&name) {
                found.push(format!("{name} {}", v.trim_end_matches('"')));
            }
            name = "";
        }
    }
    found
}

const METHOD: &str = "\
Each contender runs the same bank account: `Opened` and `Deposited` events, and a deposit \
command that loads the account from its events, checks that it is open and that the amount is \
positive, and appends one event. No snapshots anywhere. Each contender has its own database, \
dropped and created at the start of the run. A measurement opens a fresh connection pool \
(sized for its clients), opens the accounts (untimed; this also warms every connection's \
prepared statements) and then starts the clients together; each client runs its deposits \
one after another, and runs a deposit again when the contender reports a conflict. Latency is \
what the client waited for a deposit, retries included. After each run the harness loads \
every account and compares the balance with the acknowledged deposits; in the contention \
table it also reads the stored `Deposited` events and matches them one by one to the \
acknowledged deposits (each has a unique amount): \"lost\" = acknowledged but not stored, \
\"doubled\" = stored more often than acknowledged. A warm-up round (a quarter of the work) \
runs first and is discarded; in every round the contenders take turns per scenario in a \
rotated order.

- **thalo**: `Repository::execute` on `thalo_postgres::PgEventStore` with its defaults \
  (notify after commit, 5 attempts on conflict). On one pooled connection: load = one \
  `SELECT`; append = one statement that checks the version and inserts the event and its \
  outbox row; a background task of the store then `NOTIFY`s the latest position (shared by \
  concurrent appends). Internal retries are counted by wrapping the store.
- **thalo (notify in tx)**: the same with \
  `PgEventStore::builder(pool).notify_mode(NotifyMode::InTransaction)`: `pg_notify` inside the \
  append statement, which makes Postgres serialise the commits of concurrent appends.
- **thalo (cached)**: thalo with `Repository::with_cache`: the repository keeps each \
  account it has decided on in memory with its version, so a deposit is one statement (the \
  version-checked append); a stale entry shows up as a conflict, is dropped and reloaded. The \
  accounts are opened through the same repository, so timed deposits start from the cache: \
  this is the case of commands routed to the process that owns the aggregate. Not the same \
  work as the others (no load per command); shown to measure what the cache saves.
- **cqrs-es**: `CqrsFramework::execute` (`postgres_es::postgres_cqrs`). One `SELECT`, then \
  `BEGIN`, one `INSERT` per event, `COMMIT`. No outbox; a conflict is returned \
  (`AggregateConflict`) and retried by the harness.
- **esrs**: `AggregateManager::lock_and_load` + `handle_command`, as esrs documents: a \
  session advisory lock per aggregate on a second pooled connection, `SELECT`, `BEGIN`, one \
  `INSERT` per event, `COMMIT`, unlock. Commands on one aggregate wait for each other instead \
  of conflicting. No outbox.
- **disintegrate**: `DecisionMaker::make` with a state query over the account's events. \
  `SELECT` of the matching events (with its epoch function), then a `SERIALIZABLE` transaction \
  that takes advisory locks, re-checks with `SELECT EXISTS`, inserts and commits. Conflicts \
  (`Error::Concurrency`, serialization failures) are retried by the harness. No outbox, no \
  per-stream sequence.
- **raw sqlx (1 tx)**: the physical limit with a plain transaction: `BEGIN`, `SELECT` the \
  stream, `INSERT` the event, `INSERT` the outbox row, `COMMIT` (5 round trips), on Thalo's \
  table layout, a unique violation being the conflict.
- **raw sqlx (2 stmts)**: the fewest round trips with the same guarantees, on one pooled \
  connection: `SELECT` the stream, then one statement that inserts the event and its outbox \
  row.
";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let config = Config::from_args()?;
    let sizes = Sizes::new(config.quick);
    let frameworks: Vec<Box<dyn Framework>> = vec![
        Box::new(thalo::Thalo {
            notify: ::thalo_postgres::NotifyMode::AfterCommit,
            cached: false,
        }),
        Box::new(thalo::Thalo {
            notify: ::thalo_postgres::NotifyMode::InTransaction,
            cached: false,
        }),
        Box::new(thalo::Thalo {
            notify: ::thalo_postgres::NotifyMode::AfterCommit,
            cached: true,
        }),
        Box::new(cqrs_es::CqrsEs),
        Box::new(esrs::Esrs),
        Box::new(disintegrate::Disintegrate),
        Box::new(raw::Raw::Transaction),
        Box::new(raw::Raw::Minimal),
    ];
    let env = environment(&config.url).await?;
    let load_before = load_average();
    let mut bench = Bench {
        config,
        frameworks,
        keys: Keys::default(),
        long: Vec::new(),
        samples: BTreeMap::new(),
        errors: BTreeMap::new(),
    };
    bench.setup(sizes).await?;
    bench.round(0, sizes.warm_up(), false).await;
    for round in 1..=bench.config.rounds {
        bench.round(round, sizes, true).await;
    }

    let command = std::iter::once(
        "cargo run --release --manifest-path benches/compare/Cargo.toml --".to_owned(),
    )
    .chain(bench.config.args.iter().cloned())
    .collect::<Vec<_>>()
    .join(" ");
    let tables = bench.tables(sizes);
    println!("{tables}");
    let mut report = String::new();
    let _ = writeln!(report, "# Thalo and its peers, side by side\n");
    let _ = writeln!(
        report,
        "Produced by `benches/compare` with:\n\n```sh\n{command}\n```\n"
    );
    let _ = writeln!(
        report,
        "## Machine\n\n{env}- load average (1, 5, 15 min) at start: {load_before}; at end: {}\n",
        load_average()
    );
    let _ = writeln!(report, "## Method\n\n{METHOD}");
    let _ = writeln!(report, "## Results\n\n{tables}");
    std::fs::write(&bench.config.out, report)
        .with_context(|| format!("writing {}", bench.config.out.display()))?;
    eprintln!("wrote {}", bench.config.out.display());
    Ok(())
}
