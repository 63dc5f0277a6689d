//! The bank service on the real stack: HTTP API -> Postgres event store -> outbox relay
//! -> Kafka -> consumer -> `bank_balances` read model in Postgres; beside them, on the
//! store, the transfer process manager and the `bank_owners` view.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusHandle;
use thalo::Shutdown;
use thalo::{AggregateType as _, Error, Repository};
use thalo_kafka::{KafkaConfig, KafkaConsumer, KafkaRelay, TopicNaming};
use thalo_postgres::{PgEventStore, PgProcessManager, PgProjection as _, PgSubscription};
use tokio::net::TcpListener;
use tracing::info;

use crate::http::{router, AppState};
use crate::owners::PgOwners;
use crate::pg::{PgBalances, BALANCES_VERSION};
use crate::readiness::Readiness;
use crate::transfer::Transfers;
use crate::BankAccount;

/// Accounts the service keeps in memory between commands (`Repository::with_cache`).
const ACCOUNT_CACHE: usize = 10_000;

/// How often the relay measures the outbox (`thalo_outbox_depth` and its siblings).
const OUTBOX_GAUGES_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How often the service deletes expired idempotency keys.
const PRUNE_COMMANDS_EVERY: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// Settings of [`start`].
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Postgres URL.
    pub database_url: String,
    /// Kafka bootstrap servers.
    pub kafka_brokers: String,
    /// librdkafka properties for every Kafka client of the service (relay, consumer,
    /// dead-letter producer, admin clients): TLS, SASL, timeouts.
    pub kafka_properties: Vec<(String, String)>,
    /// Connections of the Postgres pool.
    pub pg_max_connections: u32,
    /// Where the HTTP API listens.
    pub listen: SocketAddr,
    /// Postgres schema of the event store and the read model.
    pub schema: String,
    /// Prefix of the Kafka topics (empty: the topic is `bank_account`).
    pub topic_prefix: String,
    /// Prefix of the balances projection's consumer group (default: none). The group
    /// is derived from the projection: `<prefix>bank_balances` for version 1,
    /// `<prefix>bank_balances@v<N>` for version N (see
    /// [`thalo_kafka::projection_group_id`]).
    pub group_prefix: String,
    /// This instance's static group membership id (`group.instance.id`): stable across
    /// restarts, unique per running instance. A restarted instance (even after SIGKILL)
    /// takes its partitions back as soon as it rejoins, instead of waiting for the
    /// broker to expire its dead session.
    pub instance_id: String,
    /// What `GET /metrics` renders: the handle of the Prometheus recorder installed for
    /// the process ([`crate::prometheus::install`]). `None`: `GET /metrics` is 404.
    pub metrics: Option<PrometheusHandle>,
    /// How long a shutdown may take (`bank serve --shutdown-timeout-secs`, default
    /// 10 s). The relay gets half of it to finish the batch in hand.
    pub shutdown_timeout: std::time::Duration,
    /// The balances read model's version (default [`BALANCES_VERSION`]). A version that
    /// is not live yet is rebuilt from the store beside the live one, takes over reads
    /// once it has caught up, and is then fed by its own consumer group
    /// (`<group prefix>bank_balances@v<N>` from version 2 on).
    pub balances_version: u32,
    /// How long a transfer's deposit may take before the transfer is compensated
    /// (`bank serve --transfer-timeout-ms`, default 30 s). A durable timer: it fires
    /// after restarts too.
    pub transfer_timeout: std::time::Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            database_url: "postgres://postgres@127.0.0.1:5432/thalo_test".to_owned(),
            kafka_brokers: "127.0.0.1:9092".to_owned(),
            kafka_properties: Vec::new(),
            pg_max_connections: 10,
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            schema: "bank".to_owned(),
            topic_prefix: String::new(),
            group_prefix: String::new(),
            instance_id: default_instance_id(),
            metrics: None,
            shutdown_timeout: std::time::Duration::from_secs(10),
            balances_version: BALANCES_VERSION,
            transfer_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// `bank-<host name>`: one instance per host keeps its partitions across restarts.
pub fn default_instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("bank-{host}")
}

/// A started service: its address, and a handle that waits for it to stop.
#[derive(Debug)]
pub struct Running {
    /// The address the API listens on (useful with port 0).
    pub addr: SocketAddr,
    /// The store, for inspection.
    pub store: PgEventStore,
    /// The read model, for inspection.
    pub balances: PgBalances,
    /// The balances-by-owner view, for inspection.
    pub owners: PgOwners,
    /// The checks of `GET /readyz`, for inspection.
    pub readiness: Readiness,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Running {
    /// Waits until the service has stopped (after `shutdown` was cancelled).
    ///
    /// # Errors
    ///
    /// The first error of the relay, the consumer or the HTTP server.
    pub async fn stopped(self) -> Result<(), Error> {
        self.task
            .await
            .map_err(|e| Error::handler("bank service", e))?
    }
}

/// Starts the service: migrates the store, creates the read models, and runs the relay,
/// the balances consumer, the transfer process manager, the owners view and the HTTP
/// API until `shutdown` is cancelled.
///
/// # Errors
///
/// Returns an error when Postgres is unreachable or the listener cannot bind. Broker
/// outages are retried by the relay and the consumer while the service runs.
pub async fn start(config: ServiceConfig, shutdown: Shutdown) -> Result<Running, Error> {
    let pool = thalo_postgres::sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.pg_max_connections.max(3))
        .connect(&config.database_url)
        .await
        .map_err(|e| Error::store("connecting to Postgres", e))?;
    let store = PgEventStore::builder(pool)
        .schema(config.schema.clone())
        .build()?;
    store.migrate().await?;
    let balances = PgBalances::with_version(&store, config.balances_version).await?;
    let owners = PgOwners::new(&store).await?;
    let rebuild = store.live_version(balances.name()).await? != Some(balances.version());
    // One Kafka configuration for every client, so the relay and the consumer agree on
    // the cluster, its security settings and the topic names.
    let mut kafka = KafkaConfig::new(config.kafka_brokers.clone())
        .with_topic_naming(TopicNaming::prefixed(config.topic_prefix.clone()))
        .with_group_prefix(config.group_prefix.clone());
    for (key, value) in &config.kafka_properties {
        kafka = kafka.set(key.clone(), value.clone());
    }
    let topic = kafka.topic_naming().topic(BankAccount::TYPE);
    // A wrong CA, password or address is reported at once, in words; the relay and the
    // consumer keep retrying (the cluster may just not be up yet), and `/readyz` says
    // so. In the background: the API serves (and answers `/readyz`) meanwhile.
    tokio::spawn({
        let kafka = kafka.clone();
        async move {
            if let Err(err) = kafka.check(std::time::Duration::from_secs(10)).await {
                tracing::error!(error = %thalo_kafka::error_chain(&err), "Kafka is not reachable yet; the relay and the consumer keep trying");
            }
        }
    });

    let relay = KafkaRelay::from_store(&store, kafka.brokers())
        .with_kafka_config(&kafka)
        // The outbox gauges of `/metrics` are this fresh.
        .with_lag_log_interval(OUTBOX_GAUGES_EVERY)
        // Within the service's own bound: acknowledgements that do not come by then are
        // published again after the restart.
        .with_shutdown_grace(config.shutdown_timeout / 2);
    // The consumer group derives from the projection's name and version
    // (`bank_balances`, `bank_balances@v2`): a new version's consumer reads the topic
    // from its start and skips what its rebuild from the store applied.
    let consumer = KafkaConsumer::for_projection_from_kafka_config(&kafka)
        .subscribe::<BankAccount>()
        .with_instance_id(config.instance_id.clone())
        // With static membership a restarted member rejoins under its old identity at
        // once; the session timeout only bounds how long the partitions of an instance
        // that never comes back wait for a rebalance.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000");

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::config(format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::config(format!("no local address: {e}")))?;
    // Accounts this service has decided on stay in memory, so a command on a known
    // account is one append; a write from elsewhere (another instance, the CLI) shows up
    // as a conflict, and the command is decided again on the reloaded account.
    let readiness = Readiness::new(
        store.pool().clone(),
        &kafka,
        topic.clone(),
        relay.clone(),
        consumer.handle(),
        shutdown.clone(),
    );
    let app = router(AppState {
        repository: Repository::new(store.clone()).with_cache(ACCOUNT_CACHE),
        balances: balances.clone(),
        owners: owners.clone(),
        readiness: readiness.clone(),
        metrics: config.metrics.clone(),
    });
    info!(%addr, topic, "bank service listening");

    // Five parts; when one stops (shutdown, or a fatal error), the others stop too.
    let stop_all_on_exit = |shutdown: Shutdown| {
        move |result: Result<(), Error>| {
            shutdown.trigger();
            result
        }
    };
    let relay_task = tokio::spawn({
        let (shutdown, done) = (shutdown.clone(), stop_all_on_exit(shutdown.clone()));
        async move { done(relay.run(shutdown).await) }
    });
    let consumer_task = tokio::spawn({
        let (store, balances) = (store.clone(), balances.clone());
        let (shutdown, done) = (shutdown.clone(), stop_all_on_exit(shutdown.clone()));
        async move {
            if rebuild {
                if let Err(err) = rebuild_from_store(&store, &balances, &shutdown).await {
                    return done(Err(err));
                }
            }
            done(
                consumer
                    .run_projection(store, balances, shutdown)
                    .await
                    .map(|_| ()),
            )
        }
    });
    // Transfers: the process manager and the owners view follow the store itself (not
    // Kafka), in its global order; each commits its effects with its checkpoint.
    let process_task = tokio::spawn({
        let manager = PgProcessManager::new(
            store.clone(),
            Transfers {
                timeout: config.transfer_timeout,
            },
        );
        let (shutdown, done) = (shutdown.clone(), stop_all_on_exit(shutdown.clone()));
        async move { done(manager.run(shutdown).await.map(|_| ())) }
    });
    let owners_task = tokio::spawn({
        let subscription = PgSubscription::new_set(store.clone(), owners.clone());
        let (shutdown, done) = (shutdown.clone(), stop_all_on_exit(shutdown.clone()));
        async move { done(subscription.run(shutdown).await.map(|_| ())) }
    });
    let server_task = tokio::spawn({
        let (shutdown, done) = (shutdown.clone(), stop_all_on_exit(shutdown.clone()));
        async move {
            let server = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.triggered().await })
                .await
                .map_err(|e| Error::handler("http server", e));
            done(server)
        }
    });
    // Idempotency keys older than the store's retention are ignored already; deleting
    // them keeps the `commands` table small.
    tokio::spawn({
        let (store, shutdown) = (store.clone(), shutdown.clone());
        async move {
            let mut every = tokio::time::interval(PRUNE_COMMANDS_EVERY);
            loop {
                tokio::select! {
                    () = shutdown.triggered() => return,
                    _ = every.tick() => match store.prune_commands().await {
                        Ok(0) => {}
                        Ok(pruned) => info!(pruned, "pruned expired idempotency keys"),
                        Err(err) => tracing::warn!(error = %err, "pruning idempotency keys failed"),
                    },
                }
            }
        }
    });
    let task = tokio::spawn(async move {
        let joined = |name: &'static str| move |e| Error::handler(name, e);
        let server = server_task.await.map_err(joined("http server"))?;
        let relay = relay_task.await.map_err(joined("relay"))?;
        let consumer = consumer_task.await.map_err(joined("consumer"))?;
        let process = process_task
            .await
            .map_err(joined("transfer process manager"))?;
        let owners = owners_task.await.map_err(joined("owners view"))?;
        server.and(relay).and(consumer).and(process).and(owners)
    });
    Ok(Running {
        addr,
        store,
        balances,
        owners,
        readiness,
        task,
    })
}

/// Builds a balances version that is not live yet from the store, beside the live one
/// (which keeps serving reads), and makes it live once it has caught up. Store errors are
/// retried; shutdown stops the rebuild (the next start resumes it from its checkpoint).
async fn rebuild_from_store(
    store: &PgEventStore,
    balances: &PgBalances,
    shutdown: &Shutdown,
) -> Result<(), Error> {
    let version = balances.version();
    info!(
        version,
        "building the balances read model from the store; the live version keeps serving reads"
    );
    let started = std::time::Instant::now();
    let subscription = PgSubscription::new::<BankAccount>(store.clone(), balances.clone())
        .with_read_model(vec![balances.read_model()])
        .with_batch_size(1000);
    loop {
        let caught_up = tokio::select! {
            () = shutdown.triggered() => return Ok(()),
            caught_up = subscription.catch_up() => caught_up,
        };
        match caught_up {
            Ok(applied) => {
                let live = store.live_version(balances.name()).await?;
                info!(
                    version,
                    live = ?live,
                    applied = applied.applied,
                    elapsed = ?started.elapsed(),
                    "balances read model rebuilt; the consumer takes over"
                );
                return Ok(());
            }
            Err(err @ Error::Store { .. }) => {
                tracing::warn!(error = %err, "rebuilding the balances read model failed; retrying");
                tokio::select! {
                    () = shutdown.triggered() => return Ok(()),
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
            Err(err) => return Err(err),
        }
    }
}
