//! The processes under test: the broker and the bank service.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::process::{Child, Command};

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?)
}

/// Sends `signal` to the child and waits for it to exit, SIGKILLing it after `grace`.
async fn stop_child(child: &mut Child, signal: &str, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status();
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
        let _ = child.wait().await;
    }
}

/// A tansu broker of the run's own, on a port of its own.
#[derive(Debug)]
pub struct Broker {
    binary: PathBuf,
    dir: PathBuf,
    storage: String,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    /// Starts the broker with its log in `dir` and its data in `storage` (a tansu
    /// storage URL: `memory://tansu/`, or `sqlite://broker.db`, relative to `dir`).
    pub async fn start(binary: &Path, dir: &Path, storage: &str) -> anyhow::Result<Broker> {
        let mut broker = Broker {
            binary: binary.to_owned(),
            dir: dir.to_owned(),
            storage: storage.to_owned(),
            port: free_port()?,
            child: None,
        };
        broker.spawn().await?;
        Ok(broker)
    }

    /// The bootstrap servers.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Freezes the broker (SIGSTOP) for `pause`, then thaws it (SIGCONT): connections
    /// stay open and nothing is answered meanwhile, as in a long GC pause or a network
    /// partition.
    pub async fn freeze(&self, pause: Duration) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .context("the broker is not running")?;
        let signal = |signal: &str| {
            std::process::Command::new("kill")
                .arg(signal)
                .arg(pid.to_string())
                .status()
                .with_context(|| format!("kill {signal} {pid}"))
        };
        signal("-STOP")?;
        tokio::time::sleep(pause).await;
        signal("-CONT")?;
        Ok(())
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        // tansu resolves the SQLite path against its working directory.
        let child = Command::new(&self.binary)
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &self.storage])
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir.join("broker.log"))?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting the broker `{}` (cargo install tansu --locked --version 0.6.0 \
                     --features dynostore,libsql,postgres; or set TANSU_BIN)",
                    self.binary.display()
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(self.brokers())
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!(
                    "the broker did not start; see {}/broker.log",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Stops the broker with SIGTERM, or SIGKILL when `kill` (its data stays either
    /// way), and starts it again.
    pub async fn restart(&mut self, kill: bool) -> anyhow::Result<()> {
        if kill {
            if let Some(mut child) = self.child.take() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        } else {
            self.stop().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.spawn().await
    }

    /// Stops the broker (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, "-TERM", Duration::from_secs(10)).await;
        }
    }
}

/// The bank service (`bank serve`) on a port of its own.
#[derive(Debug)]
pub struct Service {
    binary: PathBuf,
    log: PathBuf,
    /// The run's id, for group names.
    id: String,
    /// Keep one consumer group and static member id across restarts (as deployed);
    /// otherwise every start joins a group of its own (see `RELIABILITY.md`).
    stable_group: bool,
    /// Starts so far.
    starts: u32,
    port: u16,
    envs: Vec<(&'static str, String)>,
    child: Option<Child>,
}

impl Service {
    /// The service's configuration; `start` runs it.
    pub fn new(
        binary: &Path,
        dir: &Path,
        database_url: &str,
        application: &str,
        schema: &str,
        brokers: &str,
        id: &str,
    ) -> anyhow::Result<Service> {
        let port = free_port()?;
        // The application name lets the harness find (and terminate) the service's
        // Postgres sessions, and only those.
        let separator = if database_url.contains('?') { '&' } else { '?' };
        let database_url = format!("{database_url}{separator}application_name={application}");
        Ok(Service {
            binary: binary.to_owned(),
            log: dir.join("bank.log"),
            port,
            envs: vec![
                ("DATABASE_URL", database_url),
                ("KAFKA_BROKERS", brokers.to_owned()),
                ("BANK_SCHEMA", schema.to_owned()),
                ("BANK_LISTEN", format!("127.0.0.1:{port}")),
                ("BANK_TOPIC_PREFIX", format!("faults-{id}-")),
            ],
            id: id.to_owned(),
            stable_group: false,
            starts: 0,
            child: None,
        })
    }

    /// Keeps one consumer group and static member id across restarts.
    pub fn with_stable_group(mut self, stable: bool) -> Self {
        self.stable_group = stable;
        self
    }

    /// The API's base URL.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the service and waits until its API answers.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let (id, generation) = (&self.id, if self.stable_group { 0 } else { self.starts });
        let child = Command::new(&self.binary)
            .arg("serve")
            .env(
                "BANK_GROUP_PREFIX",
                format!("bank-faults-{id}-g{generation}."),
            )
            .env(
                "BANK_INSTANCE_ID",
                format!("bank-faults-{id}-g{generation}"),
            )
            .envs(self.envs.iter().map(|(k, v)| (*k, v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("FAULTS_SERVICE_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stdout(Stdio::null())
            .stderr(log_file(&self.log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("{}/accounts", self.base_url());
        loop {
            if http.get(&url).send().await.is_ok() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                // A start can fail while its Postgres sessions are being terminated:
                // start again.
                eprintln!("  the service exited at start ({status}); starting it again");
                return Box::pin(self.start()).await;
            }
            if Instant::now() > deadline {
                bail!("the service did not start; see {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no shutdown, no commit, no unlock.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Stops the service gracefully (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, "-TERM", Duration::from_secs(10)).await;
        }
    }
}
