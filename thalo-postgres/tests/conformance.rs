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

/// The same suite on a store that writes no outbox rows (a Postgres-only deployment).
mod without_outbox {
    use super::common;

    async fn new_store() -> common::GuardedStore {
        let db = common::store_with(10, |b| b.outbox(false)).await;
        common::GuardedStore {
            store: db.store,
            guard: db.guard,
        }
    }

    thalo_testing::store_conformance_tests!(new_store);
}
