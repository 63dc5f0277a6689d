//! The metrics the repository and the in-process subscription record, read back through
//! `metrics-util`'s `DebuggingRecorder` installed for this thread only.

use std::collections::HashMap;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;
use thalo::{
    commands, events, Aggregate, CommandId, Error, EventEnvelope, EventHandler, InMemoryEventStore,
    Once, Projection, Repository, Subscription,
};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Meter {
    #[identity]
    id: u64,
    total: u64,
}

#[commands]
impl Meter {
    pub fn add(&self, by: u64) -> Result<AddedEvent, Error> {
        if by == 0 {
            return Err(Error::invariant_code("ZERO"));
        }
        Ok(AddedEvent { by })
    }
}

#[events]
impl Meter {
    pub fn added(&mut self, by: u64) {
        self.total = self.total.saturating_add(by);
    }
}

struct Sink;

impl EventHandler<MeterEvent> for Sink {
    async fn handle(&self, _: &EventEnvelope<MeterEvent>) -> Result<(), Error> {
        Ok(())
    }
}

impl Projection<MeterEvent> for Sink {
    fn name(&self) -> &str {
        "sink"
    }
}

/// (kind, name, sorted labels) -> value, from one snapshot (counters are read and reset).
type Metrics = HashMap<(MetricKind, String, Vec<(String, String)>), DebugValue>;

fn snapshot(recorder: &DebuggingRecorder) -> Metrics {
    recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (kind, key) = key.into_parts();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            ((kind, key.name().to_owned(), labels), value)
        })
        .collect()
}

fn counter(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    match metrics.get(&(MetricKind::Counter, name.to_owned(), labels)) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        Some(other) => panic!("{name} is not a counter: {other:?}"),
    }
}

fn outcome(metrics: &Metrics, outcome: &str) -> u64 {
    counter(
        metrics,
        "thalo_commands_total",
        &[("aggregate_type", "meter"), ("outcome", outcome)],
    )
}

#[test]
fn commands_cache_and_projections_are_counted_exactly() {
    let recorder = DebuggingRecorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stats = runtime.block_on(async {
        let store = InMemoryEventStore::new();
        let cached = Repository::new(store.clone()).with_cache(16);
        let other = Repository::new(store.clone());
        let add = |by| MeterCommand::Add { by };

        // Stored, from a cache miss (the first sight of meter 1).
        cached.execute::<Meter>(&1, add(1)).await.expect("add");
        // Another writer moves meter 1 on: the cached entry is stale now.
        other.execute::<Meter>(&1, add(1)).await.expect("add");
        // A cache hit whose append conflicts, one retry on a miss, stored.
        cached.execute::<Meter>(&1, add(1)).await.expect("add");
        // Rejected by the aggregate, cached or loaded.
        let err = cached.execute::<Meter>(&1, add(0)).await.expect_err("zero");
        assert_eq!(err.code(), Some("ZERO"));
        // Keyed: stored once, then replayed from the record.
        let key = CommandId::new("req-1").expect("key");
        let first = cached
            .execute_once::<Meter>(&1, key.clone(), add(2))
            .await
            .expect("first");
        assert!(matches!(first, Once::Stored(_)));
        let again = cached
            .execute_once::<Meter>(&1, key, add(2))
            .await
            .expect("again");
        assert!(again.is_replayed());
        // With one attempt, a conflict is not retried: conflict_exhausted.
        let once_only = Repository::new(store.clone())
            .with_cache(16)
            .with_max_attempts(1);
        once_only.execute::<Meter>(&2, add(1)).await.expect("add");
        other.execute::<Meter>(&2, add(1)).await.expect("add");
        let err = once_only
            .execute::<Meter>(&2, add(1))
            .await
            .expect_err("stale");
        assert!(err.is_conflict(), "{err}");

        let mut subscription = Subscription::new::<Meter>(store.clone(), Sink);
        assert_eq!(subscription.catch_up().await.expect("catch up"), 6);
        [cached, once_only].map(|repo| repo.cache_stats().expect("cache"))
    });

    let metrics = snapshot(&recorder);
    // cached: 1st, 3rd, keyed; other: 2; once_only: 1.
    assert_eq!(outcome(&metrics, "stored"), 6, "{metrics:#?}");
    assert_eq!(outcome(&metrics, "replayed"), 1);
    assert_eq!(outcome(&metrics, "rejected"), 1);
    assert_eq!(outcome(&metrics, "conflict_exhausted"), 1);
    assert_eq!(outcome(&metrics, "error"), 0);
    let meter = [("aggregate_type", "meter")];
    assert_eq!(
        counter(&metrics, "thalo_command_conflicts_total", &meter),
        1,
        "only the retried conflict"
    );
    // Hits (appends from a cached aggregate): the stale 3rd command, the replay, and
    // once_only's stale attempt. Misses (loads): the 1st, the retry of the 3rd, the
    // rejected one (its cached aggregate rejected it, so it is decided on a load, and
    // its entry stays out), the keyed one (no entry since the rejection), and
    // once_only's 1st.
    let hits = counter(&metrics, "thalo_cache_hits_total", &meter);
    let misses = counter(&metrics, "thalo_cache_misses_total", &meter);
    assert_eq!(hits, stats[0].hits + stats[1].hits, "as CacheStats counts");
    assert_eq!(
        misses,
        stats[0].misses + stats[1].misses,
        "as CacheStats counts"
    );
    assert_eq!((hits, misses), (3, 5));

    let key = (
        MetricKind::Histogram,
        "thalo_command_duration_seconds".to_owned(),
        vec![("aggregate_type".to_owned(), "meter".to_owned())],
    );
    match metrics.get(&key) {
        Some(DebugValue::Histogram(samples)) => {
            assert_eq!(samples.len(), 9, "one sample per command");
            assert!(samples.iter().all(|s| s.into_inner() >= 0.0));
        }
        other => panic!("no duration histogram: {other:?}"),
    }

    let gauge = |name: &str| {
        let key = (
            MetricKind::Gauge,
            name.to_owned(),
            vec![("projection".to_owned(), "sink".to_owned())],
        );
        match metrics.get(&key) {
            Some(DebugValue::Gauge(value)) => value.into_inner(),
            other => panic!("no gauge {name}: {other:?}"),
        }
    };
    // Six events in the log (the rejected, replayed and conflicting commands stored
    // nothing), all read in one batch: caught up.
    assert_eq!(gauge("thalo_projection_position"), 6.0);
    assert_eq!(gauge("thalo_projection_lag_events"), 0.0);
}

/// Reads the projection's lag gauges while it handles events, to see the values the
/// subscription set after the batch before.
struct Watcher {
    recorder: &'static DebuggingRecorder,
    seen: std::sync::Mutex<Vec<(f64, f64)>>,
}

impl EventHandler<MeterEvent> for Watcher {
    async fn handle(&self, _: &EventEnvelope<MeterEvent>) -> Result<(), Error> {
        let metrics = snapshot(self.recorder);
        let gauge = |name: &str| match metrics.get(&(
            MetricKind::Gauge,
            name.to_owned(),
            vec![("projection".to_owned(), "watcher".to_owned())],
        )) {
            Some(DebugValue::Gauge(value)) => value.into_inner(),
            _ => -1.0,
        };
        self.seen.lock().expect("lock").push((
            gauge("thalo_projection_lag_events"),
            gauge("thalo_projection_lag_seconds"),
        ));
        Ok(())
    }
}

impl Projection<MeterEvent> for Watcher {
    fn name(&self) -> &str {
        "watcher"
    }
}

#[test]
fn a_projection_behind_the_log_reports_how_far_in_events_and_time() {
    let recorder: &'static DebuggingRecorder = Box::leak(Box::new(DebuggingRecorder::new()));
    let _local = metrics::set_default_local_recorder(recorder);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let seen = runtime.block_on(async {
        let store = InMemoryEventStore::new();
        let repository = Repository::new(store.clone());
        for by in 1..=4 {
            repository
                .execute::<Meter>(&1, MeterCommand::Add { by })
                .await
                .expect("add");
        }
        // The events are at least 50 ms old when the projection starts.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let watcher = Watcher {
            recorder,
            seen: std::sync::Mutex::new(Vec::new()),
        };
        let mut subscription = Subscription::new::<Meter>(store, watcher).with_batch_size(2);
        assert_eq!(subscription.catch_up().await.expect("catch up"), 4);
        let seen = subscription.projection().seen.lock().expect("lock").clone();
        seen
    });
    // Events 1-2: no batch done yet. Events 3-4: the first batch was full, so at least
    // a batch waits, and its last event was stored 50 ms or more before.
    assert_eq!(seen.len(), 4);
    assert_eq!(
        seen[0],
        (-1.0, -1.0),
        "nothing recorded before the first batch"
    );
    let (events, seconds) = seen[2];
    assert_eq!(events, 2.0, "a full batch: a batch more may wait");
    assert!(
        seconds >= 0.05,
        "behind by the age of the batch's last event: {seconds}"
    );
    // The last batch was not full: caught up, 0 behind.
    let metrics = snapshot(recorder);
    for name in [
        "thalo_projection_lag_events",
        "thalo_projection_lag_seconds",
    ] {
        assert_eq!(
            metrics.get(&(
                MetricKind::Gauge,
                name.to_owned(),
                vec![("projection".to_owned(), "watcher".to_owned())],
            )),
            Some(&DebugValue::Gauge(0.0.into())),
            "{name} once caught up"
        );
    }
}
