//! The whole service in process, on the real stack: Postgres at `DATABASE_URL` and a
//! Kafka-compatible broker at `KAFKA_BROKERS`, in a schema, topics and a consumer group
//! of its own. A missing service fails the test: it never skips.

use std::time::Duration;

use library::http::{ErrorBody, Executed, CORRELATION_ID};
use library::loans::Loan;
use library::{run, Config};
use serde_json::json;
use thalo::Shutdown;
use thalo_kafka::KafkaConfig;
use thalo_postgres::sqlx::PgPool;
use tokio::net::TcpListener;
use uuid::Uuid;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Postgres and the broker, or a failure that says how to get them.
async fn require_services() -> (PgPool, String) {
    let url = env_or(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/thalo_test",
    );
    let pool = PgPool::connect(&url).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at DATABASE_URL={url}: {e}. Start it (scripts/test.sh \
             or `docker compose up -d --wait postgres redpanda` do) or point DATABASE_URL at \
             one. This test never skips."
        )
    });
    let brokers = env_or("KAFKA_BROKERS", "127.0.0.1:9092");
    if let Err(e) = KafkaConfig::new(brokers.clone())
        .check(Duration::from_secs(10))
        .await
    {
        panic!(
            "no Kafka-compatible broker answers at KAFKA_BROKERS={brokers}: {e}. Start one \
             (scripts/test.sh or `docker compose up -d --wait postgres redpanda` do) or point \
             KAFKA_BROKERS at one. This test never skips."
        );
    }
    (pool, brokers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_borrowed_book_is_on_loan_as_soon_as_the_borrow_answers() {
    let (pool, brokers) = require_services().await;
    let id = Uuid::new_v4().simple();
    let config = Config {
        database_url: env_or(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/thalo_test",
        ),
        kafka_brokers: brokers,
        schema: format!("library_{id}"),
        topic_prefix: format!("library-{id}."),
        group_prefix: format!("library-{id}."),
        // The first command also waits for the consumer to join its group.
        projection_timeout: Duration::from_secs(30),
    };
    let schema = config.schema.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let shutdown = Shutdown::new();
    // Requests sent before the server is up wait in the listener's backlog.
    let service = tokio::spawn(run(config, listener, shutdown.clone()));
    let http = reqwest::Client::new();

    let joined = http
        .post(format!("{base}/members/card-1"))
        .json(&json!({"name": "Ada"}))
        .send()
        .await
        .expect("join");
    assert_eq!(joined.status(), 200);
    assert_eq!(joined.json::<Executed>().await.expect("body").version, 1);

    let correlation_id = Uuid::new_v4();
    let borrowed = http
        .post(format!("{base}/members/card-1/loans"))
        .header(CORRELATION_ID, correlation_id.to_string())
        .json(&json!({"book": "Dune"}))
        .send()
        .await
        .expect("borrow");
    assert_eq!(borrowed.status(), 200);
    assert_eq!(
        borrowed.json::<Executed>().await.expect("body"),
        Executed {
            version: 2,
            correlation_id
        }
    );

    // Read-your-writes: no sleep, no retry. The borrow answered once the read model,
    // fed through the outbox, the broker and the consumer, showed it; with the request's
    // correlation id, carried in the event's metadata all the way.
    let loans: Vec<Loan> = http
        .get(format!("{base}/members/card-1/loans"))
        .send()
        .await
        .expect("loans")
        .json()
        .await
        .expect("loans body");
    assert_eq!(
        loans,
        [Loan {
            book: "Dune".into(),
            correlation_id: Some(correlation_id)
        }]
    );

    // A rejected command answers with its code and stores nothing.
    let again = http
        .post(format!("{base}/members/card-1/loans"))
        .json(&json!({"book": "Dune"}))
        .send()
        .await
        .expect("borrow again");
    assert_eq!(again.status(), 422);
    let body: ErrorBody = again.json().await.expect("error body");
    assert_eq!(body.code, "ALREADY_BORROWED");
    let stranger = http
        .post(format!("{base}/members/card-2/loans"))
        .json(&json!({"book": "Emma"}))
        .send()
        .await
        .expect("borrow without joining");
    assert_eq!(stranger.status(), 422);
    let body: ErrorBody = stranger.json().await.expect("error body");
    assert_eq!(body.code, "NOT_A_MEMBER");

    let returned = http
        .delete(format!("{base}/members/card-1/loans/Dune"))
        .send()
        .await
        .expect("return");
    assert_eq!(returned.status(), 200);
    assert_eq!(returned.json::<Executed>().await.expect("body").version, 3);
    let loans: Vec<Loan> = http
        .get(format!("{base}/members/card-1/loans"))
        .send()
        .await
        .expect("loans")
        .json()
        .await
        .expect("loans body");
    assert_eq!(loans, []);

    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(30), service)
        .await
        .expect("the service stops after shutdown")
        .expect("the service task")
        .expect("the service stops without an error");
    thalo_postgres::sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .expect("drop the test schema");
}
