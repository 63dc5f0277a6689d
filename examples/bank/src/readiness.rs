//! `GET /readyz`: whether this instance should get traffic.
//!
//! `GET /healthz` says the process serves HTTP (liveness: restart it if not).
//! `GET /readyz` says whether it can do its job: 200 when every check passes, 503 when
//! one fails, with every check in the body either way:
//!
//! | check      | passes when                                                              |
//! |------------|--------------------------------------------------------------------------|
//! | `shutdown` | no shutdown has begun (SIGTERM turns it off at once, so a load balancer drains the instance while in-flight requests finish) |
//! | `postgres` | `SELECT 1` answers within 1 s                                             |
//! | `kafka`    | the broker answers a metadata request for the topic within 1 s (the answer is kept for 2 s, so probes cost at most one request per 2 s) |
//! | `relay`    | the outbox relay runs, as the leader or as a standby                     |
//! | `consumer` | the balances consumer runs and has joined its group                      |
//!
//! ```text
//! {"ready":false,"checks":[{"name":"shutdown","ok":true,"detail":"serving"},
//!   {"name":"postgres","ok":true,"detail":"reachable"},
//!   {"name":"kafka","ok":false,"detail":"cannot fetch metadata from 127.0.0.1:1: ..."}, ...]}
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thalo::Shutdown;
use thalo_kafka::rdkafka::producer::{BaseProducer, Producer as _};
use thalo_kafka::{ConsumerHandle, KafkaConfig, KafkaRelay};
use thalo_postgres::sqlx::{self, PgPool};
use tokio::sync::Mutex;

/// How long the Postgres and broker checks may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a broker check's answer is reused.
const BROKER_CACHE: Duration = Duration::from_secs(2);

/// One check of a [`ReadinessReport`].
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Check {
    /// `shutdown`, `postgres`, `kafka`, `relay` or `consumer`.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was seen: the error of a failed check, the state of a passed one.
    pub detail: String,
}

/// The body of `GET /readyz`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct ReadinessReport {
    /// Whether every check passed (then the status is 200, else 503).
    pub ready: bool,
    /// Every check, in a fixed order.
    pub checks: Vec<Check>,
}

impl ReadinessReport {
    /// The check named `name`, if the report has one.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|check| check.name == name)
    }
}

/// The service's readiness checks; clones share the broker client and its cached
/// answer.
#[derive(Clone, Debug)]
pub struct Readiness {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    broker: BrokerProbe,
    relay: KafkaRelay,
    consumer: ConsumerHandle,
    shutdown: Shutdown,
}

/// Asks the broker for the topic's metadata on one long-lived client (one request, no
/// new connection per check), and keeps the answer for [`BROKER_CACHE`].
struct BrokerProbe {
    brokers: String,
    topic: String,
    /// `Err` when the client could not be created (invalid configuration).
    client: Result<Arc<BaseProducer>, String>,
    /// The last answer and when it came. Held while a check runs, so concurrent probes
    /// wait for that one instead of sending their own.
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl std::fmt::Debug for BrokerProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerProbe")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl Readiness {
    /// The checks of a service with this pool, Kafka configuration and topic, relay,
    /// consumer and shutdown signal.
    pub fn new(
        pool: PgPool,
        kafka: &KafkaConfig,
        topic: String,
        relay: KafkaRelay,
        consumer: ConsumerHandle,
        shutdown: Shutdown,
    ) -> Self {
        let client = kafka
            .client_config()
            .create::<BaseProducer>()
            .map(Arc::new)
            .map_err(|e| format!("invalid Kafka configuration: {e}"));
        Readiness {
            inner: Arc::new(Inner {
                pool,
                broker: BrokerProbe {
                    brokers: kafka.brokers().to_owned(),
                    topic,
                    client,
                    last: Mutex::new(None),
                },
                relay,
                consumer,
                shutdown,
            }),
        }
    }

    /// Runs every check (Postgres and the broker concurrently).
    pub async fn check(&self) -> ReadinessReport {
        let inner = &self.inner;
        let shutdown = if inner.shutdown.is_triggered() {
            Check::failed("shutdown", "shutting down")
        } else {
            Check::passed("shutdown", "serving")
        };
        let (postgres, kafka) = tokio::join!(self.postgres(), inner.broker.check());
        let checks = vec![shutdown, postgres, kafka, self.relay(), self.consumer()];
        ReadinessReport {
            ready: checks.iter().all(|check| check.ok),
            checks,
        }
    }

    async fn postgres(&self) -> Check {
        let ping = sqlx::query("SELECT 1").execute(&self.inner.pool);
        match tokio::time::timeout(CHECK_TIMEOUT, ping).await {
            Ok(Ok(_)) => Check::passed("postgres", "reachable"),
            Ok(Err(err)) => Check::failed("postgres", err.to_string()),
            Err(_) => Check::failed(
                "postgres",
                format!("no answer within {} ms", CHECK_TIMEOUT.as_millis()),
            ),
        }
    }

    fn relay(&self) -> Check {
        let status = self.inner.relay.status();
        match (status.running, status.active) {
            (false, _) => Check::failed("relay", "stopped"),
            (true, true) => Check::passed("relay", format!("leader (epoch {})", status.epoch)),
            (true, false) => Check::passed("relay", "standby"),
        }
    }

    fn consumer(&self) -> Check {
        let consumer = &self.inner.consumer;
        if !consumer.is_running() {
            return Check::failed("consumer", "not running");
        }
        if !consumer.has_joined() {
            return Check::failed("consumer", "joining its group");
        }
        let partitions = consumer.assigned_partitions().len();
        Check::passed("consumer", format!("{partitions} partitions assigned"))
    }
}

impl BrokerProbe {
    async fn check(&self) -> Check {
        let mut last = self.last.lock().await;
        let fresh = last
            .as_ref()
            .filter(|(at, _)| at.elapsed() < BROKER_CACHE)
            .map(|(_, answer)| answer.clone());
        let answer = match fresh {
            Some(answer) => answer,
            None => {
                let answer = self.ask().await;
                *last = Some((Instant::now(), answer.clone()));
                answer
            }
        };
        match answer {
            Ok(()) => Check::passed("kafka", "reachable"),
            Err(err) => Check::failed("kafka", err),
        }
    }

    async fn ask(&self) -> Result<(), String> {
        let client = Arc::clone(self.client.as_ref().map_err(Clone::clone)?);
        let topic = self.topic.clone();
        let fetched = tokio::task::spawn_blocking(move || {
            let fetched = client
                .client()
                .fetch_metadata(Some(&topic), CHECK_TIMEOUT)
                .map(|_| ());
            // Serve the client's event queue (errors, logs), which nothing else polls.
            client.poll(Duration::ZERO);
            fetched
        })
        .await
        .map_err(|e| format!("the broker check failed: {e}"))?;
        fetched.map_err(|e| format!("cannot fetch metadata from {}: {e}", self.brokers))
    }
}

impl Check {
    fn passed(name: &str, detail: impl Into<String>) -> Self {
        Check {
            name: name.to_owned(),
            ok: true,
            detail: detail.into(),
        }
    }

    fn failed(name: &str, detail: impl Into<String>) -> Self {
        Check {
            name: name.to_owned(),
            ok: false,
            detail: detail.into(),
        }
    }
}
