//! The bank service under faults.
//!
//! Concurrent clients drive the bank's HTTP API with deposits and withdrawals, each with
//! its own `Idempotency-Key`, retrying ambiguous failures (connection errors, timeouts,
//! 5xx, 409) with the same key until they get a definitive answer, as a careful client
//! does. Meanwhile the harness, in turn:
//!
//! - SIGKILLs the service and starts it again;
//! - terminates every Postgres session of the service (`pg_terminate_backend`);
//! - freezes its broker for 3 s (SIGSTOP, SIGCONT), or restarts it (`--broker-fault
//!   restart`: tansu on `sqlite://` storage; or a broker of yours with `--brokers` and
//!   `--broker-restart-command`). `RELIABILITY.md` says why freezing is the default.
//!
//! Then it stops the load, lets the stack settle and checks that every acknowledged
//! command is stored exactly once (with the event id the client was given), that no
//! command is stored twice and no rejected one at all, that the balances add up to what
//! the clients were told, that the read model equals the fold of the stored events, that
//! the outbox is empty and that nothing is parked. It prints the figures (and writes
//! them with `--report`), and exits non-zero when a check fails.
//!
//! ```text
//! cargo build -p bank && cargo run -p bank-faults -- --seconds 45
//! ```

mod checks;
mod client;
mod procs;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use sqlx::PgPool;

use crate::client::{Client, Tally};
use crate::procs::Service;

/// The broker under test.
#[derive(Debug)]
enum Broker {
    /// A tansu broker of the run's own.
    Own(Box<procs::Broker>),
    /// A broker given with --brokers, restarted by a shell command.
    External { brokers: String, restart: String },
}

impl Broker {
    fn brokers(&self) -> String {
        match self {
            Broker::Own(broker) => broker.brokers(),
            Broker::External { brokers, .. } => brokers.clone(),
        }
    }

    /// Injects the broker fault; returns what it did.
    async fn fault(&mut self, args: &Args) -> anyhow::Result<()> {
        match self {
            Broker::Own(broker) if args.broker_fault == "freeze" => {
                broker.freeze(Duration::from_secs(3)).await
            }
            Broker::Own(broker) => broker.restart(args.kill_broker).await,
            Broker::External { restart, .. } => {
                let status = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(&*restart)
                    .status()
                    .await
                    .with_context(|| format!("running `{restart}`"))?;
                if !status.success() {
                    bail!("`{restart}` failed: {status}");
                }
                Ok(())
            }
        }
    }
}

/// Fault injection for the bank service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// How long the load and the faults run.
    #[arg(long, default_value_t = 45)]
    seconds: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// Each client's pause between two commands, in milliseconds (a client waits for
    /// each answer anyway; this sets the offered load).
    #[arg(long, default_value_t = 50)]
    think_ms: u64,
    /// Accounts the clients share.
    #[arg(long, default_value_t = 6)]
    accounts: usize,
    /// The faults to inject, in turn: `kill` (SIGKILL the service and start it
    /// again), `sessions` (terminate its Postgres sessions), `broker` (see
    /// --broker-fault).
    #[arg(long, default_value = "kill,sessions,broker")]
    faults: String,
    /// Keep one consumer group (and static member id) across the service's restarts, as
    /// the bank is deployed. By default every start of the service joins a consumer
    /// group of its own and reads the topic from its start, relying on the projection's
    /// per-stream checkpoints to skip what it applied before: tansu 0.6 sometimes wedges
    /// a static member's group after a SIGKILL under load (see RELIABILITY.md).
    #[arg(long)]
    stable_group: bool,
    /// How long the SIGKILLed service stays down before it is started again, in ms.
    #[arg(long, default_value_t = 300)]
    restart_delay_ms: u64,
    /// Seconds between two faults.
    #[arg(long, default_value_t = 4)]
    fault_every: u64,
    /// How long the stack may take to settle after the load.
    #[arg(long, default_value_t = 90)]
    settle_seconds: u64,
    /// Postgres (a schema of its own is created and, on success, dropped).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/thalo_test"
    )]
    database_url: String,
    /// The `bank` binary (default: beside this one).
    #[arg(long, env = "BANK_BIN")]
    bank: Option<PathBuf>,
    /// The `tansu` binary.
    #[arg(long, env = "TANSU_BIN", default_value = "tansu")]
    tansu: PathBuf,
    /// The broker fault, on a tansu broker of the run's own: `freeze` (memory storage;
    /// SIGSTOP for 3 s, then SIGCONT), `restart` (sqlite storage, which keeps topics
    /// and offsets; SIGTERM, or SIGKILL with --kill-broker, then start again). See
    /// RELIABILITY.md for why `freeze` is the default with tansu 0.6.
    #[arg(long, default_value = "freeze")]
    broker_fault: String,
    /// Restart the broker with SIGKILL instead of SIGTERM (`--broker-fault restart`).
    #[arg(long)]
    kill_broker: bool,
    /// Use this broker instead of starting tansu (e.g. the compose file's Redpanda).
    #[arg(long, requires = "broker_restart_command")]
    brokers: Option<String>,
    /// With --brokers: the shell command that restarts it, keeping its data (e.g.
    /// `docker compose restart redpanda`).
    #[arg(long)]
    broker_restart_command: Option<String>,
    /// Also write the figures, as Markdown, to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// Faults injected, by kind.
#[derive(Debug, Default)]
pub struct Faults {
    service_kills: u32,
    session_terminations: u32,
    sessions_terminated: u64,
    broker_restarts: u32,
    /// The longest time from a fault until the read model moved again.
    slowest_recovery: Duration,
    /// Faults after which the read model did not move within the bound.
    unrecovered: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let bank = match &args.bank {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory of the current executable")?
            .join("bank"),
    };
    if !bank.exists() {
        bail!(
            "the bank binary is not at {} (build it with `cargo build -p bank`, or pass --bank)",
            bank.display()
        );
    }
    let work = std::env::temp_dir().join(format!("bank-faults-{id}"));
    std::fs::create_dir_all(&work)?;
    let schema = format!("faults_{id}");
    let application = format!("bank-faults-{id}");

    println!(
        "bank-faults {id}: {} s of load and faults, {} clients, {} accounts; logs in {}",
        args.seconds,
        args.clients,
        args.accounts,
        work.display()
    );
    let admin = PgPool::connect(&args.database_url)
        .await
        .context("connecting to Postgres at DATABASE_URL")?;
    let mut broker = match (&args.brokers, args.broker_fault.as_str()) {
        (Some(brokers), _) => Broker::External {
            brokers: brokers.clone(),
            restart: args.broker_restart_command.clone().unwrap_or_default(),
        },
        (None, "freeze" | "none") => Broker::Own(Box::new(
            procs::Broker::start(&args.tansu, &work, "memory://tansu/").await?,
        )),
        (None, "restart") => Broker::Own(Box::new(
            procs::Broker::start(&args.tansu, &work, "sqlite://broker.db").await?,
        )),
        (None, other) => bail!("unknown --broker-fault {other} (freeze, restart or none)"),
    };
    let mut service = Service::new(
        &bank,
        &work,
        &args.database_url,
        &application,
        &schema,
        &broker.brokers(),
        &id,
    )?
    .with_stable_group(args.stable_group);
    service.start().await?;

    let outcome = run(
        &args,
        &admin,
        &mut service,
        &mut broker,
        &schema,
        &application,
    )
    .await;
    service.stop().await;
    if let Broker::Own(broker) = &mut broker {
        broker.stop().await;
    }
    match outcome {
        Ok(report) => {
            print!("{report}");
            if let Some(path) = &args.report {
                std::fs::write(path, &report)?;
            }
            sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
                .execute(&admin)
                .await
                .context("dropping the schema")?;
            let _ = std::fs::remove_dir_all(&work);
            Ok(())
        }
        Err(err) => {
            eprintln!(
                "bank-faults FAILED; schema {schema} and the logs in {} are kept",
                work.display()
            );
            Err(err)
        }
    }
}

async fn run(
    args: &Args,
    admin: &PgPool,
    service: &mut Service,
    broker: &mut Broker,
    schema: &str,
    application: &str,
) -> anyhow::Result<String> {
    let client = Client::new(service.base_url())?;
    let accounts: Vec<String> = (0..args.accounts).map(|a| format!("F-{a}")).collect();
    let tally = Arc::new(Tally::default());
    let mut commands = Vec::new();
    for account in &accounts {
        commands.push(
            client
                .open(account, client::INITIAL_DEPOSIT, &tally)
                .await?,
        );
    }

    let loading = Arc::new(AtomicBool::new(true));
    let workers: Vec<_> = (0..args.clients)
        .map(|n| {
            let (client, accounts) = (client.clone(), accounts.clone());
            let (loading, tally) = (Arc::clone(&loading), Arc::clone(&tally));
            let think = Duration::from_millis(args.think_ms);
            tokio::spawn(async move { client.run(n, &accounts, &loading, &tally, think).await })
        })
        .collect();

    let started = Instant::now();
    let mut faults = Faults::default();
    let kinds: Vec<&str> = args.faults.split(',').map(str::trim).collect();
    if let Some(bad) = kinds
        .iter()
        .find(|k| !["kill", "sessions", "broker"].contains(k))
    {
        bail!("unknown fault kind `{bad}` in --faults (kill, sessions, broker)");
    }
    let mut turn = 0_usize;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        tokio::time::sleep(Duration::from_secs(args.fault_every)).await;
        match kinds[turn % kinds.len()] {
            "kill" => {
                service.kill().await;
                tokio::time::sleep(Duration::from_millis(args.restart_delay_ms)).await;
                service.start().await?;
                faults.service_kills += 1;
            }
            "sessions" => {
                let terminated: i64 = sqlx::query_scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE application_name = $1",
                )
                .bind(application)
                .fetch_one(admin)
                .await
                .context("terminating the service's sessions")?;
                faults.session_terminations += 1;
                faults.sessions_terminated += u64::try_from(terminated).unwrap_or(0);
            }
            // "broker"
            _ if args.broker_fault == "none" && args.brokers.is_none() => {}
            _ => {
                broker.fault(args).await?;
                faults.broker_restarts += 1;
            }
        }
        turn += 1;
        // The next fault waits until the pipeline has recovered from this one (a write
        // made after it shows in the read model): faults are injected one at a time, not
        // piled on a service that is still rejoining its consumer group.
        match checks::wait_for_recovery(admin, schema, Duration::from_secs(30)).await? {
            Some(took) => faults.slowest_recovery = faults.slowest_recovery.max(took),
            None => faults.unrecovered += 1,
        }
        println!(
            "  {:>5.1} s: {} acknowledged, {} retries so far; faults: {} SIGKILL, {} session terminations, {} broker faults",
            started.elapsed().as_secs_f64(),
            tally.acknowledged(),
            tally.retries(),
            faults.service_kills,
            faults.session_terminations,
            faults.broker_restarts
        );
    }
    loading.store(false, Ordering::SeqCst);
    for worker in workers {
        commands.extend(worker.await.context("client task")??);
    }
    let load_time = started.elapsed();

    let settle_from = Instant::now();
    let settled = checks::settle(admin, schema, Duration::from_secs(args.settle_seconds)).await?;
    let settle_time = settle_from.elapsed();
    let found = checks::check(admin, schema, &commands, &tally).await?;
    let report = checks::report(
        &faults,
        &tally,
        &found,
        load_time,
        settle_time,
        settled,
        args,
    );
    if !found.violations.is_empty() || !settled {
        print!("{report}");
        bail!(
            "{} violation(s): {:#?}",
            found.violations.len(),
            found.violations
        );
    }
    Ok(report)
}
