//! The relay and a consumer end to end over TLS, with a certificate made here (a CA of
//! the test's, a server certificate for 127.0.0.1): every client is configured by one
//! `KafkaConfig`. A client that trusts another CA, or speaks plaintext, gets a clear
//! error from `KafkaConfig::check` instead of a hang.
//!
//! tansu 0.6 cannot serve TLS itself: its `--cert` and `--key` flags are declared in
//! one exclusive group, so it refuses to get both. The test therefore runs a broker of
//! its own behind a TLS terminator (rustls) that the broker advertises as its address:
//! the clients see only TLS, and verify the terminator's certificate.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use thalo::Repository;
use thalo_kafka::{KafkaConfig, KafkaConsumer, KafkaRelay};
use tokio::process::{Child, Command};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A CA and a server certificate for 127.0.0.1/localhost signed by it: writes the CA's
/// certificate (PEM) into `dir` and returns its path, and the server's TLS acceptor.
fn certificates(dir: &Path, name: &str) -> (PathBuf, TlsAcceptor) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("thalo test CA {name}"));
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca");

    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let key = KeyPair::generate().expect("key");
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .expect("server certificate");

    let ca_path = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca_path, ca.pem()).expect("write ca");
    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config = ServerConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    (ca_path, TlsAcceptor::from(std::sync::Arc::new(config)))
}

/// Accepts TLS on `listener` and forwards the plaintext to `upstream`, connection by
/// connection, until the task is aborted. A failed handshake just closes the connection.
async fn tls_terminator(
    listener: tokio::net::TcpListener,
    upstream: String,
    acceptor: TlsAcceptor,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let Ok(mut plain) = tokio::net::TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
        });
    }
}

/// An error and its sources, as one line.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A tansu broker of the test's own, reachable only through a TLS terminator that it
/// advertises as its address.
struct TlsBroker {
    tls_port: u16,
    child: Child,
    terminator: tokio::task::JoinHandle<()>,
}

impl TlsBroker {
    async fn start(dir: &Path, acceptor: TlsAcceptor) -> TlsBroker {
        let free = || {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("free port")
        };
        let plain_port = free();
        let tls = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("terminator");
        let tls_port = tls.local_addr().expect("address").port();
        let log = std::fs::File::create(dir.join("broker.log")).expect("log");
        let child = Command::new(tansu_binary())
            .current_dir(dir)
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{plain_port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{tls_port}"))
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start tansu");
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", plain_port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the broker did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let terminator = tokio::spawn(tls_terminator(
            tls,
            format!("127.0.0.1:{plain_port}"),
            acceptor,
        ));
        TlsBroker {
            tls_port,
            child,
            terminator,
        }
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.tls_port)
    }

    async fn stop(mut self) {
        self.terminator.abort();
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_consumer_run_over_tls_and_a_wrong_ca_is_a_clear_error() {
    require_kafka().await; // the shared broker is not used, but the suite needs it anyway
    let dir = std::env::temp_dir().join(random_name("tls"));
    std::fs::create_dir_all(&dir).expect("dir");
    let (ca, acceptor) = certificates(&dir, "good");
    let (other_ca, _) = certificates(&dir, "other");
    let broker = TlsBroker::start(&dir, acceptor).await;

    // A plaintext client and a client that trusts another CA: clear errors, quickly.
    let started = Instant::now();
    let plain = KafkaConfig::new(broker.brokers())
        .check(Duration::from_secs(5))
        .await
        .expect_err("plaintext against TLS");
    let wrong_ca = KafkaConfig::new(broker.brokers())
        .set("security.protocol", "ssl")
        .set("ssl.ca.location", other_ca.display().to_string())
        .check(Duration::from_secs(5))
        .await
        .expect_err("a CA that did not sign the broker's certificate");
    assert!(started.elapsed() < Duration::from_secs(15), "no hang");
    let text = chain(&wrong_ca);
    assert!(
        text.to_lowercase().contains("ssl") || text.to_lowercase().contains("certificate"),
        "the error says it is TLS: {text}"
    );
    assert!(matches!(plain, thalo::Error::Broker { .. }), "{plain}");

    // One configuration for every client.
    let (naming, _topic) = naming();
    let config = KafkaConfig::new(broker.brokers())
        .set("security.protocol", "ssl")
        .set("ssl.ca.location", ca.display().to_string())
        .with_topic_naming(naming);
    config
        .check(Duration::from_secs(10))
        .await
        .expect("the right CA");

    let db = TestDb::new().await;
    let shutdown = CancellationToken::new();
    let relay = KafkaRelay::from_store(&db.store, "unused:9092")
        .with_kafka_config(&config)
        .with_topic_settings(topic_settings())
        .with_poll_interval(Duration::from_millis(200));
    let relay_task = tokio::spawn({
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        async move { relay.run(shutdown).await }
    });
    let consumer = KafkaConsumer::for_projection_from_kafka_config(&config)
        .with_group_prefix(format!("{}.", random_name("group")))
        .with_topic_settings(topic_settings())
        .subscribe::<Account>();
    let consumer_task =
        tokio::spawn(consumer.run_projection(db.store.clone(), db.projection(), shutdown.clone()));

    let repo = Repository::new(db.store.clone());
    let mut stored = Vec::new();
    for i in 0..20_i64 {
        stored.extend(
            repo.execute::<Account>(
                &format!("acc-{}", i % 4),
                AccountCommand::Deposit { amount: i + 1 },
            )
            .await
            .expect("deposit"),
        );
    }
    db.store
        .wait_until_projected(&db.projection(), &stored, Duration::from_secs(60))
        .await
        .expect("the projection over TLS applies every event");
    let balances = db.balances().await;
    assert_eq!(balances.values().map(|r| r.1).sum::<i64>(), 20);
    assert_eq!(
        balances.values().map(|r| r.0).sum::<i64>(),
        (1..=20).sum::<i64>()
    );
    assert_eq!(db.outbox_len().await, 0);

    shutdown.cancel();
    relay_task.await.expect("relay task").expect("relay");
    consumer_task
        .await
        .expect("consumer task")
        .expect("consumer");
    broker.stop().await;
    db.drop_schema().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The relay reads its outbox from a Postgres that accepts only TLS (`sslmode=verify-full`,
/// `scripts/tls-postgres.sh`, started by `scripts/test.sh`) and publishes every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_from_a_tls_only_postgres() {
    let brokers = require_kafka().await;
    let url = std::env::var("THALO_TLS_DATABASE_URL").expect(
        "THALO_TLS_DATABASE_URL is not set: run scripts/test.sh, which starts a TLS-only \
         Postgres (scripts/tls-postgres.sh)",
    );
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .connect(&url)
        .await
        .expect("connecting over TLS with sslmode=verify-full");
    let schema = random_name("tls");
    let store = thalo_postgres::PgEventStore::builder(pool.clone())
        .schema(&schema)
        .build()
        .expect("store");
    store.migrate().await.expect("migrate over TLS");

    let (naming, topic) = naming();
    let shutdown = CancellationToken::new();
    let relay = KafkaRelay::from_store(&store, brokers)
        .with_topic_naming(naming)
        .with_topic_settings(topic_settings())
        .with_poll_interval(Duration::from_millis(200));
    let relay_task = tokio::spawn({
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        async move { relay.run(shutdown).await }
    });
    let repo = Repository::new(store.clone());
    for i in 0..10_i64 {
        repo.execute::<Account>(
            &format!("acc-{}", i % 3),
            AccountCommand::Deposit { amount: i + 1 },
        )
        .await
        .expect("deposit over TLS");
    }
    let messages = read_topic(&topic, 10, Duration::from_secs(30)).await;
    assert_eq!(messages.len(), 10, "every event was published");
    eventually(Duration::from_secs(10), "the outbox to drain", || async {
        let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{schema}\".outbox"))
            .fetch_one(&pool)
            .await
            .expect("outbox");
        left == 0
    })
    .await;

    shutdown.cancel();
    relay_task.await.expect("relay task").expect("relay");
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .expect("drop schema");
}
