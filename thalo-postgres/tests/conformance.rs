//! The shared `EventStore` conformance suite, against Postgres (a fresh schema per test).

mod common;

async fn new_store() -> common::GuardedStore {
    let db = common::store().await;
    common::GuardedStore {
        store: db.store,
        guard: db.guard,
    }
}

thalo_testing::store_conformance_tests!(new_store);
