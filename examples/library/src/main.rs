//! `cargo run -p library`: the library service, until Ctrl-C (or SIGTERM).
//!
//! Reads `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/thalo_test`),
//! `KAFKA_BROKERS` (default `127.0.0.1:9092`) and `LIBRARY_LISTEN` (default
//! `127.0.0.1:3000`).

use library::{run, Config};
use thalo::{Error, Shutdown};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let defaults = Config::default();
    let config = Config {
        database_url: std::env::var("DATABASE_URL").unwrap_or(defaults.database_url),
        kafka_brokers: std::env::var("KAFKA_BROKERS").unwrap_or(defaults.kafka_brokers),
        ..defaults
    };
    let listen = std::env::var("LIBRARY_LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = TcpListener::bind(&listen)
        .await
        .map_err(|e| Error::config(format!("cannot listen on {listen}: {e}")))?;
    tracing::info!(%listen, "library service listening");
    run(config, listener, Shutdown::on_signal()).await
}
