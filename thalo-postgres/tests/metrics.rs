//! The store's metrics, read back through `metrics-util`'s `DebuggingRecorder`: appends
//! and their events, group-commit batch sizes, and a `PgSubscription`'s position.
//!
//! The recorder is installed for this thread only, so the tests run on a current-thread
//! runtime (the group committer and the subscription run on the same thread).

mod common;

use common::{deposits, new_id, Account, AccountEvent, TestDb};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;
use thalo::{Error, EventEnvelope, EventStore, Metadata};
use thalo_postgres::{GroupCommit, PgProjection, PgSubscription};

/// One recorded metric: kind, name, labels, value.
type Recorded = (MetricKind, String, Vec<(String, String)>, DebugValue);

/// The value of the metric `name` of `kind` with exactly `labels`.
fn value<'a>(
    snapshot: &'a [Recorded],
    kind: MetricKind,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a DebugValue> {
    snapshot
        .iter()
        .find(|(k, n, l, _)| {
            *k == kind
                && n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(lk, lv)| l.iter().any(|(k, v)| k == lk && v == lv))
        })
        .map(|(_, _, _, v)| v)
}

fn snapshot(recorder: &DebuggingRecorder) -> Vec<Recorded> {
    recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (kind, key) = key.into_parts();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (kind, key.name().to_owned(), labels, value)
        })
        .collect()
}

struct Nothing;

impl PgProjection<AccountEvent> for Nothing {
    fn name(&self) -> &str {
        "nothing"
    }

    async fn handle(
        &self,
        _: &mut sqlx::PgConnection,
        _: &EventEnvelope<AccountEvent>,
    ) -> Result<(), Error> {
        Ok(())
    }
}

#[tokio::test]
async fn appends_group_commit_batches_and_subscriptions_are_measured() {
    let recorder = DebuggingRecorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    // A wait long enough that the eight concurrent appends below share batches.
    let db: TestDb = common::store_with(10, |b| {
        b.group_commit(GroupCommit::default().with_max_wait(std::time::Duration::from_millis(20)))
    })
    .await;

    let appends = (0..8).map(|_| {
        let store = db.store.clone();
        async move {
            store
                .append::<Account>(&new_id(), 0, deposits([1, 2]), &Metadata::default())
                .await
                .expect("append")
        }
    });
    futures_util::future::join_all(appends).await;
    // Nothing to store: not an append.
    db.store
        .append::<Account>(&new_id(), 0, Vec::new(), &Metadata::default())
        .await
        .expect("empty append");

    let subscription = PgSubscription::new::<Account>(db.store.clone(), Nothing);
    let applied = subscription.catch_up().await.expect("catch up");
    assert_eq!(applied.applied, 16);

    let snapshot = snapshot(&recorder);
    let account = [("aggregate_type", "pg_test_account")];
    assert_eq!(
        value(
            &snapshot,
            MetricKind::Counter,
            "thalo_appends_total",
            &account
        ),
        Some(&DebugValue::Counter(8)),
        "{snapshot:#?}"
    );
    assert_eq!(
        value(
            &snapshot,
            MetricKind::Counter,
            "thalo_append_events_total",
            &account
        ),
        Some(&DebugValue::Counter(16))
    );
    let Some(DebugValue::Histogram(batches)) = value(
        &snapshot,
        MetricKind::Histogram,
        "thalo_group_commit_batch_size",
        &[],
    ) else {
        panic!("no batch size histogram: {snapshot:#?}");
    };
    let sizes: Vec<f64> = batches.iter().map(|s| s.into_inner()).collect();
    assert_eq!(
        sizes.iter().sum::<f64>(),
        8.0,
        "every append in one batch: {sizes:?}"
    );
    assert!(sizes.len() < 8, "appends shared batches: {sizes:?}");

    let position = db
        .store
        .read_all(0, 100)
        .await
        .expect("read")
        .last()
        .map(|e| e.position)
        .expect("events");
    assert_eq!(
        value(
            &snapshot,
            MetricKind::Gauge,
            "thalo_projection_position",
            &[("projection", "nothing")]
        ),
        Some(&DebugValue::Gauge((position as f64).into()))
    );
    assert_eq!(
        value(
            &snapshot,
            MetricKind::Gauge,
            "thalo_projection_lag_events",
            &[("projection", "nothing")]
        ),
        Some(&DebugValue::Gauge(0.0.into())),
        "caught up"
    );
}
