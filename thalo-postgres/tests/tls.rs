//! The store over TLS, against a throwaway cluster that accepts only TLS connections
//! (`scripts/tls-postgres.sh`, started by `scripts/test.sh`, which exports its URLs):
//! the conformance suite with `sslmode=verify-full`, and clear errors for a CA that did
//! not sign the server's certificate and for a plaintext connection.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use thalo::Error;
use thalo_postgres::PgEventStore;

fn tls_url(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: run scripts/test.sh, which starts a TLS-only Postgres \
             (scripts/tls-postgres.sh start DIR prints the variables)"
        )
    })
}

async fn new_store() -> common::GuardedStore {
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(60))
        .connect(&tls_url("THALO_TLS_DATABASE_URL"))
        .await
        .expect("connecting over TLS with sslmode=verify-full");
    let schema = common::random_schema();
    let store = PgEventStore::builder(pool)
        .schema(&schema)
        .build()
        .expect("store");
    store.migrate().await.expect("migrate over TLS");
    common::GuardedStore {
        store,
        // The schema lives on the throwaway cluster, which is deleted with it.
        guard: Arc::new(common::SchemaGuard { schema }),
    }
}

mod conformance_over_tls {
    thalo_testing::store_conformance_tests!(super::new_store);
}

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

#[tokio::test]
async fn connections_are_encrypted_and_a_wrong_ca_or_plaintext_is_a_clear_error() {
    let store = PgEventStore::connect(&tls_url("THALO_TLS_DATABASE_URL"))
        .await
        .expect("verify-full against the right CA");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .expect("pg_stat_ssl");
    assert!(ssl, "the connection is encrypted");

    let started = Instant::now();
    let wrong_ca = PgEventStore::connect(&tls_url("THALO_TLS_WRONG_CA_URL"))
        .await
        .expect_err("a CA that did not sign the server's certificate");
    assert!(matches!(wrong_ca, Error::Store { .. }), "{wrong_ca}");
    let text = chain(&wrong_ca).to_lowercase();
    assert!(
        text.contains("certificate") || text.contains("tls"),
        "the error says why: {text}"
    );

    let plaintext = PgEventStore::connect(&tls_url("THALO_TLS_PLAINTEXT_URL"))
        .await
        .expect_err("the cluster refuses plaintext");
    let text = chain(&plaintext);
    assert!(
        text.contains("no encryption") || text.contains("pg_hba"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "no hang");
}
