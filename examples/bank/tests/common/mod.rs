//! Shared by the bank's integration tests: the environment, and `bank serve` run as a
//! process that a test can SIGKILL and start again.

#![allow(dead_code)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use thalo_postgres::PgEventStore;
use tokio::process::{Child, Command};

/// An environment variable, or `default`.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// The bank's store in `schema` (migrated by the service), to read its events and wait
/// on its projections' checkpoints from the test.
pub fn store_in(pool: &sqlx::PgPool, schema: &str) -> PgEventStore {
    PgEventStore::builder(pool.clone())
        .schema(schema)
        .build()
        .expect("the bank's store")
}

/// The line of `account`'s balance in the output of `bank balances` or the walk-through.
pub fn balance_line<'a>(out: &'a str, account: &str) -> &'a str {
    out.lines()
        .find(|l| l.trim_start().starts_with(account) && l.contains('$'))
        .unwrap_or_else(|| panic!("no balance line for {account} in:\n{out}"))
}

/// Checks the walk-through's transfers in its output `out`: T-1 ($20.00 from ACC-001 to
/// ACC-002) completed, its money withdrawn then deposited; T-2 ($5.00 from ACC-001 to
/// the closed ACC-003) compensated, its money withdrawn then refunded.
pub fn assert_walk_through_transfers(out: &str) {
    // `  T-1      ACC-001 -> ACC-002 $20.00   -> completed`, then the events the process
    // manager's commands stored after the request.
    let transfer = |id: &str| -> (&str, &str) {
        let mut lines = out
            .lines()
            .skip_while(|l| !(l.trim_start().starts_with(&format!("{id} ")) && l.contains(" -> ")));
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("no line for transfer {id} in:\n{out}"));
        let steps = lines.next().unwrap_or_default().trim();
        (line, steps)
    };
    let (line, steps) = transfer("T-1");
    assert!(line.contains("ACC-001 -> ACC-002 $20.00"), "{line}\n{out}");
    assert!(line.trim_end().ends_with("-> completed"), "{line}\n{out}");
    assert_eq!(
        steps,
        "ACC-001 TransferWithdrawn, T-1 TransferMoneyWithdrawn, ACC-002 TransferDeposited, \
         T-1 TransferCompleted",
        "{out}"
    );
    let (line, steps) = transfer("T-2");
    assert!(line.contains("ACC-001 -> ACC-003 $5.00"), "{line}\n{out}");
    assert!(
        line.trim_end().ends_with("-> compensated (ACCOUNT_CLOSED)"),
        "{line}\n{out}"
    );
    assert_eq!(
        steps,
        "ACC-001 TransferWithdrawn, T-2 TransferMoneyWithdrawn, ACC-001 TransferRefunded, \
         T-2 TransferCompensated",
        "{out}"
    );
}

/// `bank serve` as a child process, configured by `envs`, logging to `log`.
pub struct Service {
    pub port: u16,
    pub envs: Vec<(&'static str, String)>,
    pub log: std::path::PathBuf,
    pub child: Option<Child>,
}

impl Service {
    /// Starts the service and waits until it answers `GET /healthz`.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_bank"))
            .arg("serve")
            .envs(self.envs.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the bank service");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let http = reqwest::Client::new();
        loop {
            let url = format!("http://127.0.0.1:{}/healthz", self.port);
            if http.get(&url).send().await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the service did not start: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown, no commit, no unlock.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("SIGKILL");
            let _ = child.wait().await;
        }
    }
}
