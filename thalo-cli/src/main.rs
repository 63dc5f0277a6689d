//! # `thalo`: the command line for operators
//!
//! One tool for what an operator of a Thalo service asks of its event store and its
//! Kafka pipeline:
//!
//! ```text
//! thalo status                                   # outbox, relay, parked, projections, group lag
//! thalo parked list                              # relay-parked aggregates, consumer-parked streams
//! thalo parked retry bank_account acc-1          # publish a parked aggregate again
//! thalo parked skip bank_account acc-1 --reason "poison, see INC-42"
//! thalo parked skip bank_account acc-1 --consumer balances --reason "..."
//! thalo dlq list                                 # every `*.dlq` topic
//! thalo dlq show bank_account.dlq 0 17           # one dead letter, headers and value
//! thalo projection list                          # position or streams, lag
//! thalo projection reset balances --yes --reset-group
//! thalo republish --from 1 --aggregate-type bank_account
//! thalo migrate
//! ```
//!
//! Every command prints tables, or JSON with `--json`. Postgres comes from
//! `--database-url` / `DATABASE_URL` and `--schema` / `THALO_SCHEMA`; Kafka from
//! `--brokers` / `KAFKA_BROKERS`, `THALO_KAFKA_CONFIG`, `THALO_KAFKA_<NAME>` and
//! `-X key=value`, as for `thalo-relay`.
//!
//! ## Exit status
//!
//! 0 on success; 1 on an error, with one line `error: ...` on standard error; 2 on a
//! usage error (clap's, a missing `--yes`, a missing database URL). `status` exits 0
//! when Kafka is unreachable (it says so, after the Postgres part) unless `--strict`.
//!
//! ## What it does not do
//!
//! Re-driving a stream a consumer parked runs the consumer's own projection or handler
//! code (`PgEventStore::redrive_projection` / `redrive_handler`), so it belongs in the
//! service, not here; see the crate README.

mod args;
mod dlq;
mod error;
mod kafka;
mod migrate;
mod output;
mod parked;
mod projection;
mod republish;
mod sql;
mod status;
mod store;
mod versions;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::args::{Cli, Command, DlqCommand};
use crate::error::Result;
use crate::store::{Need, Store};

#[tokio::main]
async fn main() -> ExitCode {
    // The libraries log through `tracing`; an operator's tool shows only their errors
    // unless RUST_LOG asks for more. Logs go to standard error, never into the output.
    // librdkafka's own log lines repeat, in its words, what the error says at the end.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("error,librdkafka=off,rdkafka=off")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", err.one_line());
            err.exit_code()
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let global = &cli.global;
    match cli.command {
        Command::Dlq(DlqCommand::Redrive(args)) => {
            let store = Store::open(global, Need::Migrated).await?;
            dlq::redrive(&store, args, global.json).await
        }
        Command::Dlq(command) => dlq::run(global, command).await,
        Command::Migrate => {
            let store = Store::open(global, Need::Nothing).await?;
            migrate::run(&store, global.json).await
        }
        Command::Status(args) => {
            let store = Store::open(global, Need::Migrated).await?;
            status::run(&store, global, args).await
        }
        Command::Parked(command) => {
            let store = Store::open(global, Need::Migrated).await?;
            parked::run(&store, command, global.json).await
        }
        Command::Projection(command) => {
            let store = Store::open(global, Need::Migrated).await?;
            projection::run(&store, global, command).await
        }
        Command::Republish(args) => {
            let store = Store::open(global, Need::Migrated).await?;
            republish::run(&store, args, global.json).await
        }
    }
}
