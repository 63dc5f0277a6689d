//! The bank: `cargo run -p bank` walks through the bank on the embedded, in-memory store;
//! with `DATABASE_URL` set it runs on Postgres and keeps its state between runs.
//!
//! ```text
//! bank                          the walk-through
//! bank open ACC-9 "Ada" 10.00   open an account (initial deposit in dollars)
//! bank deposit ACC-9 2.50       deposit
//! bank withdraw ACC-9 1.00      withdraw
//! bank close ACC-9              close (pays out the balance)
//! bank transfer ACC-9 ACC-7 1   transfer $1.00 (the transfer process manager moves it)
//! bank show ACC-9               the account, rebuilt from its events
//! bank balances                 every account, from the balances projection
//! bank events [ACC-9]           the stored events
//! bank serve                    the HTTP service on Postgres + Kafka (needs DATABASE_URL)
//! ```

// Amounts in cents are written as `dollars_cents` (`100_00` is $100.00).
#![allow(clippy::inconsistent_digit_grouping)]

use std::process::ExitCode;

use anyhow::Context as _;
use bank::account::Status;
use bank::balances::AccountBalance;
use bank::money::{format_cents, parse_cents};
use bank::pg::PgBalances;
use bank::service::ServiceConfig;
use bank::transfer::TransferStatus;
use bank::{Balances, BankAccount, BankAccountCommand, Transfer, TransferCommand, Transfers};
use clap::{Parser, Subcommand};
use thalo::{
    CheckpointStore, Event as _, EventStore, InMemoryEventStore, Metadata, ProcessRunner, RawEvent,
    Repository, Subscription,
};
use thalo_postgres::{PgEventStore, PgProcessManager, PgSubscription};

/// A bank built with Thalo.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Postgres to keep the events in; without it the bank runs on the in-memory store.
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Option<String>,

    /// Postgres schema of the events and the read model.
    #[arg(long, env = "BANK_SCHEMA", default_value = "bank", global = true)]
    schema: String,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Walk through opening accounts, deposits, withdrawals, a rejected command and
    /// transfers (one completed, one compensated).
    Demo,
    /// Open an account.
    Open {
        account: String,
        owner: String,
        /// Initial deposit in dollars, e.g. 10.00.
        #[arg(default_value = "0")]
        initial_deposit: String,
    },
    /// Deposit money (dollars, e.g. 2.50).
    Deposit { account: String, amount: String },
    /// Withdraw money (dollars, e.g. 1.00).
    Withdraw { account: String, amount: String },
    /// Close an account, paying out its balance.
    Close { account: String },
    /// Transfer money (dollars) between two accounts, and wait until it settles.
    Transfer {
        from: String,
        to: String,
        amount: String,
    },
    /// Show an account, rebuilt from its events.
    Show { account: String },
    /// List every account's balance, from the balances projection.
    Balances,
    /// List the stored events, of one account or of all.
    Events { account: Option<String> },
    /// Run the HTTP service: Postgres event store, outbox relay to Kafka, the balances
    /// projection fed from Kafka, and the transfer process manager and owners view fed
    /// from the store. Needs DATABASE_URL.
    Serve {
        /// Kafka bootstrap servers.
        #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
        kafka_brokers: String,
        /// Address of the HTTP API.
        #[arg(long, env = "BANK_LISTEN", default_value = "127.0.0.1:3000")]
        listen: std::net::SocketAddr,
        /// Prefix of the Kafka topics (the topic is `<prefix>bank_account`).
        #[arg(long, env = "BANK_TOPIC_PREFIX", default_value = "")]
        topic_prefix: String,
        /// Prefix of the balances projection's consumer group, which is
        /// `<prefix>bank_balances` (`<prefix>bank_balances@v<N>` for version N).
        #[arg(long, env = "BANK_GROUP_PREFIX", default_value = "")]
        group_prefix: String,
        /// Static group membership id of this instance, stable across restarts and
        /// unique per instance (default `bank-<host name>`).
        #[arg(long, env = "BANK_INSTANCE_ID")]
        instance_id: Option<String>,
        /// librdkafka properties for every Kafka client, `key=value` (repeatable), e.g.
        /// `-X security.protocol=SASL_SSL -X sasl.mechanisms=SCRAM-SHA-512`. They come
        /// after the file named by `THALO_KAFKA_CONFIG` and the `THALO_KAFKA_<NAME>`
        /// variables, and win over them.
        #[arg(short = 'X', long = "kafka-property", value_parser = parse_property)]
        kafka_properties: Vec<(String, String)>,
        /// Connections of the Postgres pool.
        #[arg(long, env = "BANK_PG_MAX_CONNECTIONS", default_value_t = 10)]
        pg_max_connections: u32,
        /// After SIGTERM or Ctrl-C, how long the service may take to stop gracefully
        /// (finish in-flight requests, stop the relay and the consumer, commit offsets)
        /// before it exits anyway, with a warning and a failure status.
        #[arg(long, env = "BANK_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
        shutdown_timeout_secs: u64,
        /// Version of the balances read model to write. A version that is not live yet
        /// is rebuilt from the store while the live one keeps serving reads, and takes
        /// over once it has caught up (blue/green).
        #[arg(long, env = "BANK_BALANCES_VERSION", default_value_t = bank::pg::BALANCES_VERSION)]
        balances_version: u32,
        /// How long a transfer's deposit may take before the transfer is compensated
        /// (the money goes back to `from`), in milliseconds.
        #[arg(long, env = "BANK_TRANSFER_TIMEOUT_MS", default_value_t = 30_000)]
        transfer_timeout_ms: u64,
    },
}

/// Runs until shutdown begins (SIGTERM, Ctrl-C, or a part of the service failing),
/// then gives the service `timeout` to stop: the HTTP server stops accepting at once
/// (and `/readyz` answers 503 to what is in flight), in-flight requests finish, the
/// relay and the consumer stop and commit. Past `timeout` the process exits anyway,
/// with a warning and a failure status.
async fn stop_within(
    running: bank::service::Running,
    shutdown: &thalo::Shutdown,
    timeout: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let stopped = running.stopped();
    tokio::pin!(stopped);
    tokio::select! {
        result = &mut stopped => {
            result?;
            return Ok(ExitCode::SUCCESS);
        }
        () = shutdown.triggered() => {}
    }
    let started = std::time::Instant::now();
    match tokio::time::timeout(timeout, stopped).await {
        Ok(result) => {
            result?;
            tracing::info!(elapsed = ?started.elapsed(), "bank service stopped");
            Ok(ExitCode::SUCCESS)
        }
        Err(_) => {
            tracing::warn!(
                timeout_secs = timeout.as_secs(),
                "the service did not stop within the shutdown timeout; exiting anyway"
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, found `{text}`"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the Tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // A blocking task still running (a Kafka client waiting out its timeout) must not
    // hold the exit up: dropping the runtime would wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let command = cli.command.unwrap_or(Command::Demo);
    if let Command::Serve {
        kafka_brokers,
        listen,
        topic_prefix,
        group_prefix,
        instance_id,
        kafka_properties,
        pg_max_connections,
        shutdown_timeout_secs,
        balances_version,
        transfer_timeout_ms,
    } = command
    {
        // THALO_KAFKA_CONFIG and THALO_KAFKA_<NAME>, then -X.
        let from_env = thalo_kafka::KafkaConfig::from_env()?;
        let kafka_properties = from_env
            .properties()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .chain(kafka_properties)
            .collect();
        let Some(database_url) = cli.database_url else {
            anyhow::bail!("`bank serve` needs Postgres: set DATABASE_URL or pass --database-url");
        };
        // The one recorder of the process, before anything registers a metric.
        let metrics = bank::prometheus::install()?;
        let shutdown_timeout = std::time::Duration::from_secs(shutdown_timeout_secs);
        let config = ServiceConfig {
            metrics: Some(metrics),
            shutdown_timeout,
            database_url,
            kafka_brokers,
            kafka_properties,
            pg_max_connections,
            listen,
            schema: cli.schema,
            topic_prefix,
            group_prefix,
            instance_id: instance_id.unwrap_or_else(bank::service::default_instance_id),
            balances_version,
            transfer_timeout: std::time::Duration::from_millis(transfer_timeout_ms),
        };
        let shutdown = thalo::Shutdown::on_signal();
        let running = bank::service::start(config, shutdown.clone()).await?;
        println!(
            "bank service listening on http://{} (Ctrl-C to stop)",
            running.addr
        );
        return stop_within(running, &shutdown, shutdown_timeout).await;
    }
    match cli.database_url {
        Some(url) => {
            let pool = thalo_postgres::sqlx::PgPool::connect(&url)
                .await
                .with_context(|| format!("connecting to {}", redact(&url)))?;
            let store = PgEventStore::builder(pool).schema(cli.schema).build()?;
            store.migrate().await.context("migrating the event store")?;
            let balances = PgBalances::new(&store).await?;
            println!("Thalo bank on Postgres ({})\n", redact(&url));
            let bank = Bank {
                store: store.clone(),
                mover: Mover::Postgres(Box::new(PgProcessManager::new(store.clone(), transfers()))),
                read_side: ReadSide::Postgres(
                    PgSubscription::new::<BankAccount>(store, balances.clone())
                        .with_read_model(vec![balances.read_model()]),
                ),
            };
            bank.run(command).await
        }
        None => {
            let store = InMemoryEventStore::new();
            if !matches!(command, Command::Demo) {
                println!("note: no DATABASE_URL, so this runs on a fresh in-memory store and keeps nothing\n");
            }
            println!("Thalo bank: embedded mode (in-memory store, in-process projection)\n");
            let bank = Bank {
                store: store.clone(),
                mover: Mover::Memory(Box::new(ProcessRunner::new(
                    Repository::new(store.clone()),
                    transfers(),
                ))),
                read_side: ReadSide::Memory(Subscription::new::<BankAccount>(
                    store,
                    Balances::default(),
                )),
            };
            bank.run(command).await
        }
    }
}

/// The transfer process manager as the CLI runs it: deposits and refunds happen at
/// once, so the timeout only matters to `bank serve`'s durable timers.
fn transfers() -> Transfers {
    Transfers {
        timeout: std::time::Duration::from_secs(30),
    }
}

/// The transfer process manager, in memory or on Postgres (where it takes turns with
/// `bank serve`'s).
enum Mover {
    Memory(Box<ProcessRunner<InMemoryEventStore, Transfers>>),
    Postgres(Box<PgProcessManager<Transfers>>),
}

impl Mover {
    /// Lets the process manager react until nothing is left to do.
    async fn settle(&mut self) -> anyhow::Result<()> {
        loop {
            let handled = match self {
                Mover::Memory(runner) => runner.catch_up().await,
                Mover::Postgres(manager) => manager.catch_up().await,
            }
            .context("running the transfer process manager")?;
            if handled == 0 {
                return Ok(());
            }
        }
    }
}

/// The balances projection, in memory or in Postgres.
enum ReadSide {
    Memory(Subscription<InMemoryEventStore, Balances, bank::BankAccountEvent>),
    Postgres(PgSubscription<PgBalances, bank::BankAccountEvent>),
}

impl ReadSide {
    /// Brings the projection up to date and returns every account.
    async fn balances(&mut self) -> anyhow::Result<Vec<AccountBalance>> {
        match self {
            ReadSide::Memory(sub) => {
                sub.catch_up().await.context("updating the projection")?;
                Ok(sub.projection().all())
            }
            ReadSide::Postgres(sub) => {
                sub.catch_up().await.context("updating the projection")?;
                Ok(sub.projection().all().await?)
            }
        }
    }
}

struct Bank<S> {
    store: S,
    mover: Mover,
    read_side: ReadSide,
}

impl<S> Bank<S>
where
    S: EventStore + CheckpointStore + Clone + 'static,
{
    async fn run(mut self, command: Command) -> anyhow::Result<ExitCode> {
        let ok = match command {
            Command::Demo => {
                self.demo().await?;
                true
            }
            Command::Open {
                account,
                owner,
                initial_deposit,
            } => {
                let initial_deposit = parse_cents(&initial_deposit).map_err(anyhow::Error::msg)?;
                self.execute(
                    &account,
                    BankAccountCommand::OpenAccount {
                        owner,
                        initial_deposit,
                    },
                )
                .await?
            }
            Command::Deposit { account, amount } => {
                let amount = parse_cents(&amount).map_err(anyhow::Error::msg)?;
                self.execute(&account, BankAccountCommand::Deposit { amount })
                    .await?
            }
            Command::Withdraw { account, amount } => {
                let amount = parse_cents(&amount).map_err(anyhow::Error::msg)?;
                self.execute(&account, BankAccountCommand::Withdraw { amount })
                    .await?
            }
            Command::Close { account } => {
                self.execute(&account, BankAccountCommand::CloseAccount)
                    .await?
            }
            Command::Transfer { from, to, amount } => {
                let amount = parse_cents(&amount).map_err(anyhow::Error::msg)?;
                let id = format!("T-{}", uuid::Uuid::new_v4().simple());
                self.transfer(&id, &from, &to, amount).await?
            }
            Command::Show { account } => self.show(&account).await?,
            Command::Balances => {
                self.print_balances().await?;
                true
            }
            Command::Events { account } => {
                self.print_events(account.as_deref()).await?;
                true
            }
            Command::Serve { .. } => anyhow::bail!("`serve` is started before a store is chosen"),
        };
        Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    /// Runs one command and prints what happened. `Ok(false)` when it was rejected.
    async fn execute(&self, account: &str, command: BankAccountCommand) -> anyhow::Result<bool> {
        let repo = Repository::new(self.store.clone());
        let metadata = Metadata::new().with_header("source", "bank-cli");
        let described = describe(&command);
        match repo
            .execute_with::<BankAccount>(&account.to_string(), command, &metadata)
            .await
        {
            Ok(stored) => {
                let events: Vec<_> = stored.iter().map(|e| e.event.event_type()).collect();
                println!(
                    "  ok       {account:<8} {described:<38} -> {}",
                    events.join(", ")
                );
                Ok(true)
            }
            Err(err) if err.is_rejection() => {
                println!(
                    "  rejected {account:<8} {described:<38} -> {}",
                    err.code().unwrap_or("rejected")
                );
                println!("           {err}");
                Ok(false)
            }
            Err(err) => Err(err).context("the command failed"),
        }
    }

    async fn demo(&mut self) -> anyhow::Result<()> {
        let steps: Vec<(&str, BankAccountCommand)> = vec![
            (
                "ACC-001",
                BankAccountCommand::OpenAccount {
                    owner: "Ada Lovelace".into(),
                    initial_deposit: 100_00,
                },
            ),
            (
                "ACC-002",
                BankAccountCommand::OpenAccount {
                    owner: "Alan Turing".into(),
                    initial_deposit: 25_00,
                },
            ),
            ("ACC-001", BankAccountCommand::Deposit { amount: 42_50 }),
            ("ACC-002", BankAccountCommand::Withdraw { amount: 10_00 }),
            ("ACC-002", BankAccountCommand::Withdraw { amount: 500_00 }),
            (
                "ACC-003",
                BankAccountCommand::OpenAccount {
                    owner: "Grace Hopper".into(),
                    initial_deposit: 0,
                },
            ),
            ("ACC-003", BankAccountCommand::Deposit { amount: 7_25 }),
            ("ACC-003", BankAccountCommand::CloseAccount),
            ("ACC-003", BankAccountCommand::Deposit { amount: 1_00 }),
        ];
        println!("Commands:");
        for (account, command) in steps {
            self.execute(account, command).await?;
        }
        println!();
        println!("Transfers (the transfer process manager withdraws, deposits, or refunds):");
        self.transfer("T-1", "ACC-001", "ACC-002", 20_00).await?;
        self.transfer("T-2", "ACC-001", "ACC-003", 5_00).await?;
        println!();
        self.print_balances().await?;
        println!();
        self.print_events(None).await?;
        println!();
        self.show("ACC-001").await?;
        Ok(())
    }

    /// Requests a transfer, lets the process manager settle it, and prints what
    /// happened. `Ok(false)` when it did not complete.
    async fn transfer(
        &mut self,
        id: &str,
        from: &str,
        to: &str,
        amount: i64,
    ) -> anyhow::Result<bool> {
        let repo = Repository::new(self.store.clone());
        let id = id.to_owned();
        let requested = repo
            .execute::<Transfer>(
                &id,
                TransferCommand::Request {
                    from: from.to_owned(),
                    to: to.to_owned(),
                    amount,
                },
            )
            .await;
        let described = format!("{from} -> {to} {}", format_cents(amount));
        let after = match requested {
            Ok(stored) => stored.first().map_or(0, |e| e.position),
            Err(err) if err.is_rejection() => {
                println!(
                    "  rejected {id:<8} {described:<38} -> {}",
                    err.code().unwrap_or("rejected")
                );
                println!("           {err}");
                return Ok(false);
            }
            Err(err) => return Err(err).context("requesting the transfer"),
        };
        self.mover.settle().await?;
        // What the process manager did: the events of this transfer since its request.
        let mut steps = Vec::new();
        let mut position = after;
        loop {
            let page = self.store.read_all(position, 500).await?;
            let Some(last) = page.last() else { break };
            position = last.position;
            for e in &page {
                let leg = serde_json::from_str::<serde_json::Value>(&e.event.payload)
                    .is_ok_and(|payload| payload["transfer"] == id.as_str());
                if e.aggregate_id == id || leg {
                    steps.push(format!("{} {}", e.aggregate_id, e.event.event_type));
                }
            }
        }
        let transfer = repo.load::<Transfer>(&id).await?.aggregate;
        let status = format!("{:?}", transfer.status()).to_lowercase();
        let reason = transfer
            .reason()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        println!("  {id:<8} {described:<38} -> {status}{reason}");
        println!("           {}", steps.join(", "));
        Ok(transfer.status() == TransferStatus::Completed)
    }

    async fn show(&self, account: &str) -> anyhow::Result<bool> {
        let repo = Repository::new(self.store.clone());
        let loaded = repo.load::<BankAccount>(&account.to_string()).await?;
        if loaded.version == 0 {
            println!("{account}: no such account");
            return Ok(false);
        }
        let a = &loaded.aggregate;
        let status = match a.status() {
            Status::New => "new",
            Status::Open => "open",
            Status::Closed => "closed",
        };
        println!(
            "{account} (rebuilt from {} events): {} owned by {}, {status}",
            loaded.version,
            format_cents(a.balance()),
            a.owner()
        );
        Ok(true)
    }

    async fn print_balances(&mut self) -> anyhow::Result<()> {
        let rows = self.read_side.balances().await?;
        println!("Balances (from the projection):");
        if rows.is_empty() {
            println!("  (no accounts)");
        }
        for row in rows {
            println!(
                "  {:<8} {:<14} {:>12}{}",
                row.account_number,
                row.owner,
                format_cents(row.balance),
                if row.closed { "  (closed)" } else { "" }
            );
        }
        Ok(())
    }

    async fn print_events(&self, account: Option<&str>) -> anyhow::Result<()> {
        println!("Stored events (global order):");
        let mut after = 0;
        loop {
            let page = self
                .store
                .read_all(after, 500)
                .await
                .context("reading events")?;
            let Some(last) = page.last() else { break };
            after = last.position;
            for e in page
                .iter()
                .filter(|e| account.is_none_or(|a| a == e.aggregate_id))
            {
                print_event(e);
            }
        }
        Ok(())
    }
}

fn print_event(e: &thalo::EventEnvelope<RawEvent>) {
    println!(
        "  #{:<4} {} {}#{} {:<15} v{} {}",
        e.position,
        e.timestamp.format("%Y-%m-%d %H:%M:%S%.3f"),
        e.aggregate_id,
        e.sequence,
        e.event.event_type,
        e.event.version,
        e.event.payload
    );
}

fn describe(command: &BankAccountCommand) -> String {
    match command {
        BankAccountCommand::OpenAccount {
            owner,
            initial_deposit,
        } => {
            format!("open for {owner} with {}", format_cents(*initial_deposit))
        }
        BankAccountCommand::Deposit { amount } => format!("deposit {}", format_cents(*amount)),
        BankAccountCommand::Withdraw { amount } => format!("withdraw {}", format_cents(*amount)),
        BankAccountCommand::CloseAccount => "close".to_string(),
        BankAccountCommand::WithdrawForTransfer { transfer, amount } => {
            format!("withdraw {} for {transfer}", format_cents(*amount))
        }
        BankAccountCommand::DepositForTransfer { transfer, amount } => {
            format!("deposit {} of {transfer}", format_cents(*amount))
        }
        BankAccountCommand::RefundTransfer { transfer, amount } => {
            format!("refund {} of {transfer}", format_cents(*amount))
        }
    }
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
