//! `bank serve` stops gracefully on SIGTERM, within its bound: it stops accepting at
//! once, the request in flight still gets its answer, the relay and the consumer stop,
//! and the process exits with success.

mod common;

use common::env_or;
use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::Command;

/// `--shutdown-timeout-secs` of the service under test.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_and_exits_within_the_bound() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let log = std::env::temp_dir().join(format!("bank-sigterm-{id}.log"));
    let log_file = std::fs::File::create(&log).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bank"))
        .arg("serve")
        .env(
            "DATABASE_URL",
            env_or(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/thalo_test",
            ),
        )
        .env("KAFKA_BROKERS", env_or("KAFKA_BROKERS", "127.0.0.1:9092"))
        .env("BANK_SCHEMA", format!("bank_{id}"))
        .env("BANK_LISTEN", format!("127.0.0.1:{port}"))
        .env("BANK_TOPIC_PREFIX", format!("sigterm-{id}-"))
        .env("BANK_GROUP_PREFIX", format!("bank-{id}."))
        .env("BANK_INSTANCE_ID", format!("bank-sigterm-{id}"))
        .env(
            "BANK_SHUTDOWN_TIMEOUT_SECS",
            SHUTDOWN_TIMEOUT.as_secs().to_string(),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the bank service");
    let pid = child.id().expect("a running child");
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();

    // Ready: Postgres, the broker, the relay and the consumer are all up, so the stop
    // below stops every part.
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = http.get(format!("{base}/readyz")).send().await;
        if ready.is_ok_and(|res| res.status() == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the service did not become ready (Postgres at DATABASE_URL and a broker at \
             KAFKA_BROKERS are required):\n{}",
            logged()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A request in flight: its headers and half its body are in, the rest comes after
    // the signal. The handler is waiting for the body when SIGTERM arrives.
    let body = r#"{"account_number":"TERM-1","owner":"Ada","initial_deposit":100}"#;
    let (first, rest) = body.split_at(body.len() / 2);
    let mut in_flight = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    in_flight
        .write_all(
            format!(
                "POST /accounts HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\n\r\n{first}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .expect("send the first half");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
    let signalled = Instant::now();

    // It stops accepting at once, while it waits for the request in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        TcpStream::connect(("127.0.0.1", port)).await.is_err(),
        "a new connection is refused once shutdown began"
    );
    assert!(
        child.try_wait().expect("child status").is_none(),
        "the process waits for the request in flight"
    );

    in_flight
        .write_all(rest.as_bytes())
        .await
        .expect("send the rest");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), in_flight.read_to_end(&mut answer))
        .await
        .expect("the answer comes")
        .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 201"),
        "the request in flight was answered: {answer}\n{}",
        logged()
    );
    assert!(answer.contains("AccountOpened"), "{answer}");

    let exit = tokio::time::timeout(SHUTDOWN_TIMEOUT + Duration::from_secs(5), child.wait())
        .await
        .unwrap_or_else(|_| panic!("the process did not exit in time:\n{}", logged()))
        .expect("exit status");
    let took = signalled.elapsed();
    assert!(exit.success(), "exit status {exit:?}:\n{}", logged());
    assert!(
        took < SHUTDOWN_TIMEOUT,
        "a graceful stop within the bound, took {took:?}:\n{}",
        logged()
    );
    assert!(
        !logged().contains("did not stop within the shutdown timeout"),
        "{}",
        logged()
    );
    eprintln!("stopped {took:?} after SIGTERM");
    let _ = std::fs::remove_file(&log);
}
