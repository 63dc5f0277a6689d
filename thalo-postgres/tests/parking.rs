//! Sequenced dead letters for consumers: a projection parks a stream on a gap or a
//! failing event, holds its later events, and a re-drive applies them from the store,
//! in order and exactly once; skips and re-drives of plain handlers; and a re-drive
//! racing the consumer.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{deposits, new_id, Account, AccountEvent, Counts, TestDb};
use sqlx::PgConnection;
use thalo::{AggregateType, Error, EventEnvelope, EventHandler, EventStore, Metadata};
use thalo_postgres::{Applied, PgEventStore, PgProjection, Redriven};
use tokio::sync::Barrier;

/// What a re-drive reports (`Redriven` is `#[non_exhaustive]`).
#[derive(Debug, PartialEq)]
struct Counted {
    applied: u64,
    sequence: u64,
}

fn counted(redriven: Option<Redriven>) -> Option<Counted> {
    redriven.map(|r| Counted {
        applied: r.applied,
        sequence: r.sequence,
    })
}

const ACCOUNT: &str = <Account as AggregateType>::TYPE;
const NAME: &str = "recorder";

#[derive(Debug, thiserror::Error)]
#[error("simulated failure at event {0}")]
struct Failure(u64);

/// Records every event it applies, in order, in `<schema>.applied` (no unique key, so a
/// double application shows); fails on the `(aggregate id, sequence)` pairs in
/// `failing`.
struct Recorder {
    insert: String,
    failing: Mutex<HashSet<(String, u64)>>,
    calls: AtomicUsize,
}

impl Recorder {
    async fn new(db: &TestDb) -> Self {
        let table = db.table("applied");
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (n BIGSERIAL PRIMARY KEY, account TEXT NOT NULL, \
             sequence BIGINT NOT NULL, amount BIGINT NOT NULL)"
        ))
        .execute(&db.pool)
        .await
        .expect("create the read model");
        Recorder {
            insert: format!("INSERT INTO {table} (account, sequence, amount) VALUES ($1, $2, $3)"),
            failing: Mutex::default(),
            calls: AtomicUsize::new(0),
        }
    }

    fn fail_on(&self, id: &str, sequence: u64) {
        self.failing
            .lock()
            .unwrap()
            .insert((id.to_owned(), sequence));
    }

    fn fix(&self) {
        self.failing.lock().unwrap().clear();
    }
}

impl PgProjection<AccountEvent> for Recorder {
    fn name(&self) -> &str {
        NAME
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<AccountEvent>,
    ) -> Result<(), Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let fails = self
            .failing
            .lock()
            .unwrap()
            .contains(&(envelope.aggregate_id.clone(), envelope.sequence));
        if fails {
            return Err(Error::handler(NAME, Failure(envelope.sequence)));
        }
        let AccountEvent::Deposited(deposit) = &envelope.event;
        sqlx::query(&self.insert)
            .bind(&envelope.aggregate_id)
            .bind(envelope.sequence as i64)
            .bind(deposit.amount)
            .execute(tx)
            .await
            .map_err(|e| Error::store("recording an event", e))?;
        Ok(())
    }
}

/// `(sequence, amount)` of every applied event of `id`, in the order applied.
async fn applied(db: &TestDb, id: &str) -> Vec<(u64, i64)> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(&format!(
        "SELECT sequence, amount FROM {} WHERE account = $1 ORDER BY n",
        db.table("applied")
    ))
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .expect("read the read model");
    rows.into_iter().map(|(s, a)| (s as u64, a)).collect()
}

/// `(sequence, amount)` of every stored event of `id`: what the read model must hold.
async fn fold(db: &TestDb, id: &str) -> Vec<(u64, i64)> {
    stream(db, id)
        .await
        .iter()
        .map(|e| {
            let AccountEvent::Deposited(deposit) = &e.event;
            (e.sequence, deposit.amount)
        })
        .collect()
}

async fn stream(db: &TestDb, id: &str) -> Vec<EventEnvelope<AccountEvent>> {
    db.store
        .read_stream::<Account>(&id.to_owned(), 0)
        .await
        .expect("read the stream")
}

/// Appends deposits of `amounts` to `id` after `version` events.
async fn append(
    db: &TestDb,
    id: &str,
    version: u64,
    amounts: impl IntoIterator<Item = i64>,
) -> Vec<EventEnvelope<AccountEvent>> {
    db.store
        .append::<Account>(
            &id.to_owned(),
            version,
            deposits(amounts),
            &Metadata::default(),
        )
        .await
        .expect("append")
}

/// The envelopes of `events` with the given sequences, in that order.
fn pick(
    events: &[EventEnvelope<AccountEvent>],
    sequences: impl IntoIterator<Item = u64>,
) -> Vec<EventEnvelope<AccountEvent>> {
    sequences
        .into_iter()
        .map(|s| {
            events
                .iter()
                .find(|e| e.sequence == s)
                .unwrap_or_else(|| panic!("no event #{s}"))
                .clone()
        })
        .collect()
}

/// `(sequence, parked)` of the projection's checkpoint of `id`.
async fn checkpoint(db: &TestDb, projection: &str, id: &str) -> Option<(i64, bool)> {
    sqlx::query_as(&format!(
        "SELECT sequence, parked FROM {} \
         WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3",
        db.table("stream_checkpoints")
    ))
    .bind(projection)
    .bind(ACCOUNT)
    .bind(id)
    .fetch_optional(&db.pool)
    .await
    .expect("read the checkpoint")
}

/// `(action, sequence, detail)` of the `parking_log` rows of `consumer` and `id`.
async fn parking_log(db: &TestDb, consumer: &str, id: &str) -> Vec<(String, Option<i64>, String)> {
    sqlx::query_as(&format!(
        "SELECT action, sequence, detail FROM {} \
         WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3 ORDER BY id",
        db.table("parking_log")
    ))
    .bind(consumer)
    .bind(ACCOUNT)
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .expect("read parking_log")
}

fn actions(log: &[(String, Option<i64>, String)]) -> Vec<&str> {
    log.iter().map(|(action, _, _)| action.as_str()).collect()
}

fn applied_only(n: usize) -> Counts {
    Counts {
        applied: n,
        duplicates: 0,
        held: 0,
    }
}

#[tokio::test]
async fn a_gap_parks_the_stream_and_a_redrive_fills_it_from_the_store() {
    let db = common::store().await;
    let projection = Recorder::new(&db).await;
    let (a, b) = (format!("a-{}", new_id()), format!("b-{}", new_id()));
    let events_a = append(&db, &a, 0, [10, 20, 30, 40, 50]).await;
    let events_b = append(&db, &b, 0, [1, 2, 3]).await;

    let mut first = pick(&events_a, [1, 2]);
    first.extend(pick(&events_b, [1]));
    assert_eq!(
        db.store
            .apply_exactly_once(&projection, &first)
            .await
            .unwrap(),
        applied_only(3)
    );

    // Event 3 of A never arrives (the relay skipped it, or the topic lost it).
    let mut second = pick(&events_a, [4]);
    second.extend(pick(&events_b, [2]));
    second.extend(pick(&events_a, [5]));
    second.extend(pick(&events_b, [3]));
    assert_eq!(
        db.store
            .apply_exactly_once(&projection, &second)
            .await
            .unwrap(),
        Counts {
            applied: 2,
            duplicates: 0,
            held: 2,
        }
    );
    assert_eq!(
        applied(&db, &a).await,
        [(1, 10), (2, 20)],
        "nothing past the gap"
    );
    assert_eq!(applied(&db, &b).await, fold(&db, &b).await, "B goes on");
    assert_eq!(checkpoint(&db, NAME, &a).await, Some((2, true)));

    let parked = db.store.parked_streams(Some(NAME)).await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    let p = &parked[0];
    assert_eq!(
        (
            p.consumer.as_str(),
            p.aggregate_type.as_str(),
            p.aggregate_id.as_str(),
            p.sequence,
            p.held
        ),
        (NAME, ACCOUNT, a.as_str(), 3, 2),
        "{p:?}"
    );
    assert!(p.error.contains("event 3"), "{}", p.error);
    assert_eq!(
        db.store.parked_stream(NAME, ACCOUNT, &a).await.unwrap(),
        Some(p.clone())
    );
    assert_eq!(db.store.parked_streams(None).await.unwrap(), parked);
    assert!(db
        .store
        .parked_streams(Some("another"))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        db.store.parked_stream(NAME, ACCOUNT, &b).await.unwrap(),
        None
    );

    // Redelivered while parked: held again, and counted.
    assert_eq!(
        db.store
            .apply_exactly_once(&projection, &pick(&events_a, [4, 5]))
            .await
            .unwrap(),
        Counts {
            applied: 0,
            duplicates: 0,
            held: 2,
        }
    );
    let p = db
        .store
        .parked_stream(NAME, ACCOUNT, &a)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((p.sequence, p.held), (3, 4));

    // The re-drive reads 3, 4 and 5 from the store and applies them once, in order.
    let redriven = db
        .store
        .redrive_projection(&projection, ACCOUNT, &a)
        .await
        .unwrap();
    assert_eq!(
        counted(redriven),
        Some(Counted {
            applied: 3,
            sequence: 5,
        })
    );
    assert_eq!(applied(&db, &a).await, fold(&db, &a).await);
    assert_eq!(checkpoint(&db, NAME, &a).await, Some((5, false)));
    assert!(db.store.parked_streams(None).await.unwrap().is_empty());
    let log = parking_log(&db, NAME, &a).await;
    assert_eq!(actions(&log), ["parked", "redriven"], "{log:?}");
    assert_eq!(log[0].1, Some(3));
    assert!(log[0].2.contains("event 3"), "{log:?}");
    assert_eq!(log[1].1, Some(5));

    // Everything again: all skipped. A second re-drive finds nothing parked.
    let mut everything = events_a.clone();
    everything.extend(events_b.clone());
    assert_eq!(
        db.store
            .apply_exactly_once(&projection, &everything)
            .await
            .unwrap(),
        Counts {
            applied: 0,
            duplicates: 8,
            held: 0,
        }
    );
    assert_eq!(
        db.store
            .redrive_projection(&projection, ACCOUNT, &a)
            .await
            .unwrap(),
        None
    );
    assert_eq!(applied(&db, &a).await, fold(&db, &a).await);
    assert_eq!(applied(&db, &b).await, fold(&db, &b).await);

    // Later events flow normally.
    let more = append(&db, &a, 5, [60]).await;
    assert_eq!(
        db.store
            .apply_exactly_once(&projection, &more)
            .await
            .unwrap(),
        applied_only(1)
    );
    assert_eq!(applied(&db, &a).await, fold(&db, &a).await);
    assert_eq!(projection.calls.load(Ordering::SeqCst), 9);
}

#[tokio::test]
async fn a_failing_event_parks_the_stream_until_the_projection_is_fixed() {
    let db = common::store().await;
    let projection = Recorder::new(&db).await;
    let (a, b) = (format!("a-{}", new_id()), format!("b-{}", new_id()));
    let events_a = append(&db, &a, 0, [1, 2, 3, 4, 5, 6]).await;
    let events_b = append(&db, &b, 0, [100, 200]).await;
    projection.fail_on(&a, 3);

    let mut first = pick(&events_a, [1, 2]);
    first.extend(pick(&events_b, [1]));
    assert_eq!(
        db.store
            .apply_exactly_once(&projection, &first)
            .await
            .unwrap(),
        applied_only(3)
    );
    let mut second = pick(&events_a, [3, 4]);
    second.extend(pick(&events_b, [2]));
    let err = db
        .store
        .apply_exactly_once(&projection, &second)
        .await
        .expect_err("event 3 fails");
    assert!(
        matches!(err, Error::Handler { ref handler, .. } if handler == NAME),
        "{err:?}"
    );
    assert_eq!(applied(&db, &b).await, [(1, 100)], "the batch rolled back");

    // The consumer gives up on A's event 3: it parks the stream and goes on.
    db.store
        .park_stream(NAME, ACCOUNT, &a, 3, "gave up after 5 attempts")
        .await
        .unwrap();
    assert_eq!(
        db.store
            .apply_exactly_once(&projection, &second)
            .await
            .unwrap(),
        Counts {
            applied: 1,
            duplicates: 0,
            held: 2,
        }
    );
    assert_eq!(
        db.store
            .apply_exactly_once(&projection, &pick(&events_a, [5, 6]))
            .await
            .unwrap(),
        Counts {
            applied: 0,
            duplicates: 0,
            held: 2,
        }
    );
    assert_eq!(applied(&db, &a).await, [(1, 1), (2, 2)]);
    assert_eq!(applied(&db, &b).await, fold(&db, &b).await);
    let parked = db
        .store
        .parked_stream(NAME, ACCOUNT, &a)
        .await
        .unwrap()
        .expect("parked");
    assert_eq!(
        (parked.sequence, parked.held, parked.error.as_str()),
        (3, 4, "gave up after 5 attempts")
    );
    assert_eq!(checkpoint(&db, NAME, &a).await, Some((2, true)));

    // Parking it again keeps the first event and error.
    db.store
        .park_stream(NAME, ACCOUNT, &a, 5, "another reason")
        .await
        .unwrap();
    let again = db
        .store
        .parked_stream(NAME, ACCOUNT, &a)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (again.sequence, again.error.as_str()),
        (3, "gave up after 5 attempts")
    );
    assert_eq!(checkpoint(&db, NAME, &a).await, Some((2, true)));

    // A re-drive while the projection still fails: nothing applied, still parked, the
    // recorded error is the new one.
    let err = db
        .store
        .redrive_projection(&projection, ACCOUNT, &a)
        .await
        .expect_err("still failing");
    assert!(
        matches!(err, Error::Handler { ref handler, .. } if handler == NAME),
        "{err:?}"
    );
    let still = db
        .store
        .parked_stream(NAME, ACCOUNT, &a)
        .await
        .unwrap()
        .expect("still parked");
    assert_eq!((still.sequence, still.held), (3, 4));
    assert!(
        still.error.contains("simulated failure at event 3"),
        "{}",
        still.error
    );
    assert!(still.updated_at >= again.updated_at);
    assert_eq!(applied(&db, &a).await, [(1, 1), (2, 2)]);
    assert_eq!(checkpoint(&db, NAME, &a).await, Some((2, true)));
    assert_eq!(actions(&parking_log(&db, NAME, &a).await), ["parked"]);

    // Fixed: the re-drive applies 3..=6 once, and the read model is the fold.
    projection.fix();
    assert_eq!(
        counted(
            db.store
                .redrive_projection(&projection, ACCOUNT, &a)
                .await
                .unwrap()
        ),
        Some(Counted {
            applied: 4,
            sequence: 6,
        })
    );
    assert_eq!(applied(&db, &a).await, fold(&db, &a).await);
    assert_eq!(applied(&db, &b).await, fold(&db, &b).await);
    assert_eq!(
        db.store.parked_stream(NAME, ACCOUNT, &a).await.unwrap(),
        None
    );
    assert_eq!(
        actions(&parking_log(&db, NAME, &a).await),
        ["parked", "redriven"]
    );
    let mut everything = events_a.clone();
    everything.extend(events_b.clone());
    let redelivered = db
        .store
        .apply_exactly_once(&projection, &everything)
        .await
        .unwrap();
    assert_eq!((redelivered.applied, redelivered.held), (0, 0));
}

#[tokio::test]
async fn skipping_a_parked_event_is_recorded_and_the_rest_is_redriven() {
    let db = common::store().await;
    let projection = Recorder::new(&db).await;
    let a = format!("a-{}", new_id());
    let events = append(&db, &a, 0, [1, 2, 3, 4, 5]).await;
    db.store
        .apply_exactly_once(&projection, &pick(&events, [1, 2]))
        .await
        .unwrap();
    let held = db
        .store
        .apply_exactly_once(&projection, &pick(&events, [4, 5]))
        .await
        .unwrap();
    assert_eq!(held.held, 2);

    let skipped = db
        .store
        .skip_parked(
            NAME,
            ACCOUNT,
            &a,
            "ticket OPS-7: event 3 is compensated by hand",
        )
        .await
        .unwrap();
    assert_eq!(skipped, Some(3));
    let log = parking_log(&db, NAME, &a).await;
    assert_eq!(actions(&log), ["parked", "skipped"], "{log:?}");
    assert_eq!(
        log[1],
        (
            "skipped".to_owned(),
            Some(3),
            "ticket OPS-7: event 3 is compensated by hand".to_owned()
        )
    );
    // Still parked, at the next event; the checkpoint moved past the skipped one.
    let parked = db
        .store
        .parked_stream(NAME, ACCOUNT, &a)
        .await
        .unwrap()
        .expect("still parked");
    assert_eq!(parked.sequence, 4);
    assert!(parked.error.contains("event 3 skipped"), "{}", parked.error);
    assert_eq!(checkpoint(&db, NAME, &a).await, Some((3, true)));
    assert_eq!(
        db.store
            .apply_exactly_once(&projection, &pick(&events, [4, 5]))
            .await
            .unwrap()
            .held,
        2,
        "held until the re-drive"
    );

    let redriven = db
        .store
        .redrive_projection(&projection, ACCOUNT, &a)
        .await
        .unwrap();
    assert_eq!(
        counted(redriven),
        Some(Counted {
            applied: 2,
            sequence: 5,
        })
    );
    assert_eq!(applied(&db, &a).await, [(1, 1), (2, 2), (4, 4), (5, 5)]);
    assert_eq!(checkpoint(&db, NAME, &a).await, Some((5, false)));
    assert_eq!(
        db.store.parked_stream(NAME, ACCOUNT, &a).await.unwrap(),
        None
    );
    assert_eq!(
        actions(&parking_log(&db, NAME, &a).await),
        ["parked", "skipped", "redriven"]
    );
    // Nothing parked: nothing to skip.
    assert_eq!(
        db.store
            .skip_parked(NAME, ACCOUNT, &a, "again")
            .await
            .unwrap(),
        None
    );
    assert_eq!(parking_log(&db, NAME, &a).await.len(), 3);
}

/// A plain event handler that records what it handled, and fails on chosen sequences.
#[derive(Default)]
struct Seen {
    handled: Mutex<Vec<(String, u64)>>,
    failing: Mutex<HashSet<u64>>,
}

impl EventHandler<AccountEvent> for Seen {
    async fn handle(&self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), Error> {
        if self.failing.lock().unwrap().contains(&envelope.sequence) {
            return Err(Error::handler("h", Failure(envelope.sequence)));
        }
        self.handled
            .lock()
            .unwrap()
            .push((envelope.aggregate_id.clone(), envelope.sequence));
        Ok(())
    }
}

#[tokio::test]
async fn redrive_handler_hands_the_parked_events_to_a_handler_in_order() {
    let db = common::store().await;
    let (a, b) = (format!("a-{}", new_id()), format!("b-{}", new_id()));
    append(&db, &a, 0, [1, 2, 3, 4, 5]).await;
    append(&db, &b, 0, [1, 2]).await;
    let handler = Seen::default();
    assert_eq!(
        db.store
            .redrive_handler("h", &handler, ACCOUNT, &a)
            .await
            .unwrap(),
        None,
        "not parked"
    );

    db.store
        .park_stream("h", ACCOUNT, &a, 3, "downstream API refused it")
        .await
        .unwrap();
    assert_eq!(
        db.store
            .parked_stream("h", ACCOUNT, &a)
            .await
            .unwrap()
            .map(|p| p.sequence),
        Some(3)
    );

    // Still failing at 4: 3 was handled, the stream stays parked at 4.
    handler.failing.lock().unwrap().insert(4);
    let err = db
        .store
        .redrive_handler("h", &handler, ACCOUNT, &a)
        .await
        .expect_err("4 fails");
    assert!(matches!(err, Error::Handler { .. }), "{err:?}");
    let parked = db
        .store
        .parked_stream("h", ACCOUNT, &a)
        .await
        .unwrap()
        .expect("still parked");
    assert_eq!(parked.sequence, 4);
    assert!(
        parked.error.contains("simulated failure at event 4"),
        "{}",
        parked.error
    );
    assert_eq!(*handler.handled.lock().unwrap(), [(a.clone(), 3)]);

    // Fixed: from 4 on, in order, and released.
    handler.failing.lock().unwrap().clear();
    assert_eq!(
        counted(
            db.store
                .redrive_handler("h", &handler, ACCOUNT, &a)
                .await
                .unwrap()
        ),
        Some(Counted {
            applied: 2,
            sequence: 5,
        })
    );
    assert_eq!(
        *handler.handled.lock().unwrap(),
        [(a.clone(), 3), (a.clone(), 4), (a.clone(), 5)],
        "no event before the parked one, none twice, nothing of other streams"
    );
    assert_eq!(
        db.store.parked_stream("h", ACCOUNT, &a).await.unwrap(),
        None
    );
    let log = parking_log(&db, "h", &a).await;
    assert_eq!(actions(&log), ["parked", "redriven"], "{log:?}");
    assert_eq!(log[1].1, Some(5));
    assert_eq!(
        db.store
            .redrive_handler("h", &handler, ACCOUNT, &a)
            .await
            .unwrap(),
        None
    );
    assert_eq!(handler.handled.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn skipping_a_handlers_parked_event_skips_the_event_it_is_stuck_on() {
    let db = common::store().await;
    let a = format!("a-{}", new_id());
    append(&db, &a, 0, [1, 2, 3, 4, 5]).await;
    let handler = Seen::default();
    db.store
        .park_stream("h", ACCOUNT, &a, 3, "downstream API refused it")
        .await
        .unwrap();
    // A re-drive gets past 3 and is stuck on 4.
    handler.failing.lock().unwrap().insert(4);
    db.store
        .redrive_handler("h", &handler, ACCOUNT, &a)
        .await
        .expect_err("4 fails");
    assert_eq!(
        db.store
            .parked_stream("h", ACCOUNT, &a)
            .await
            .unwrap()
            .map(|p| p.sequence),
        Some(4)
    );

    // The operator skips the event the handler is stuck on: 4, not 3 (handled already).
    let skipped = db
        .store
        .skip_parked("h", ACCOUNT, &a, "4 is poison")
        .await
        .unwrap();
    assert_eq!(skipped, Some(4), "the skipped event");
    let log = parking_log(&db, "h", &a).await;
    assert_eq!(
        log.last().unwrap(),
        &("skipped".to_owned(), Some(4), "4 is poison".to_owned()),
        "{log:?}"
    );
    assert_eq!(
        db.store
            .parked_stream("h", ACCOUNT, &a)
            .await
            .unwrap()
            .map(|p| p.sequence),
        Some(5)
    );

    // The re-drive hands over only what follows the skipped event, though 4 still fails.
    assert_eq!(
        counted(
            db.store
                .redrive_handler("h", &handler, ACCOUNT, &a)
                .await
                .unwrap()
        ),
        Some(Counted {
            applied: 1,
            sequence: 5,
        })
    );
    assert_eq!(
        *handler.handled.lock().unwrap(),
        [(a.clone(), 3), (a.clone(), 5)]
    );
}

#[tokio::test]
async fn a_gap_inside_a_batch_keeps_what_came_before_it() {
    let db = common::store().await;
    let projection = Recorder::new(&db).await;
    let (a, b) = (format!("a-{}", new_id()), format!("b-{}", new_id()));
    let events_a = append(&db, &a, 0, [1, 2, 3, 4, 5, 6, 7]).await;
    let events_b = append(&db, &b, 0, [1, 2, 3]).await;

    // A: 1 and 2 apply, 3 is missing, 4 and 5 are held. B is first seen at 2 (its first
    // event is older than the topic's retention, say): parked at 1.
    let mut batch = pick(&events_a, [1, 2, 4]);
    batch.extend(pick(&events_b, [2, 3]));
    batch.extend(pick(&events_a, [5]));
    assert_eq!(
        db.store
            .apply_exactly_once(&projection, &batch)
            .await
            .unwrap(),
        Counts {
            applied: 2,
            duplicates: 0,
            held: 4,
        }
    );
    assert_eq!(applied(&db, &a).await, [(1, 1), (2, 2)]);
    assert_eq!(applied(&db, &b).await, []);
    assert_eq!(checkpoint(&db, NAME, &a).await, Some((2, true)));
    assert_eq!(checkpoint(&db, NAME, &b).await, Some((0, true)));
    let parked: Vec<(String, u64, u64)> = db
        .store
        .parked_streams(Some(NAME))
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.aggregate_id, p.sequence, p.held))
        .collect();
    let mut expected = vec![(a.clone(), 3, 2), (b.clone(), 1, 2)];
    expected.sort();
    let mut parked_sorted = parked.clone();
    parked_sorted.sort();
    assert_eq!(parked_sorted, expected);

    for (id, applied_count) in [(&a, 5), (&b, 3)] {
        assert_eq!(
            db.store
                .redrive_projection(&projection, ACCOUNT, id)
                .await
                .unwrap()
                .map(|r| r.applied),
            Some(applied_count)
        );
        assert_eq!(applied(&db, id).await, fold(&db, id).await);
    }
    // The rest of A's stream, delivered late, is partly skipped.
    let late = db
        .store
        .apply_exactly_once(&projection, &pick(&events_a, [6, 7]))
        .await
        .unwrap();
    assert_eq!(late.duplicates, 2);
    assert_eq!(applied(&db, &a).await, fold(&db, &a).await);
}

/// The consumer of the race: appends the next events of `id` from 11 to `EVENTS`,
/// `BATCH` at a time, and applies each batch right after appending it.
async fn consume(
    store: PgEventStore,
    projection: Arc<Recorder>,
    start: Arc<Barrier>,
    id: String,
) -> Result<Applied, Error> {
    start.wait().await;
    let mut applied = Applied::default();
    let mut version = 10;
    while version < EVENTS {
        let next = store
            .append::<Account>(
                &id,
                version as u64,
                deposits(version + 1..=(version + BATCH).min(EVENTS)),
                &Metadata::default(),
            )
            .await?;
        version = next.last().map_or(version, |e| e.sequence as i64);
        applied += store.apply_exactly_once(&projection, &next).await?;
    }
    Ok(applied)
}

const EVENTS: i64 = 40;
const BATCH: i64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redrive_racing_the_consumer_applies_every_event_once() {
    const STREAMS: usize = 6;
    let db = common::store_with(24, |b| b).await;
    let projection = Arc::new(Recorder::new(&db).await);

    // Every stream: 1 and 2 applied, 3 lost on the way, 4..=10 held behind the gap.
    let mut ids = Vec::new();
    for i in 0..STREAMS {
        let id = format!("race-{i}-{}", new_id());
        let events = append(&db, &id, 0, 1..=10).await;
        db.store
            .apply_exactly_once(&projection, &pick(&events, [1, 2]))
            .await
            .unwrap();
        let held = db
            .store
            .apply_exactly_once(&projection, &pick(&events, 4..=10))
            .await
            .unwrap();
        assert_eq!(held.held, 7);
        ids.push(id);
    }
    assert_eq!(
        db.store.parked_streams(Some(NAME)).await.unwrap().len(),
        STREAMS
    );

    // Per stream, at once: the consumer appending and applying the next events batch by
    // batch (in order, as a partition delivers them), and two re-drives.
    let start = Arc::new(Barrier::new(STREAMS * 3));
    let mut consumers = Vec::new();
    let mut redrives = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        consumers.push(tokio::spawn(consume(
            db.store.clone(),
            Arc::clone(&projection),
            Arc::clone(&start),
            id.clone(),
        )));
        for r in 0..2 {
            // Staggered a little, so that the re-drives land among the batches.
            let delay = Duration::from_millis((i * 3 + r * 7) as u64);
            let (store, projection, start, id) = (
                db.store.clone(),
                Arc::clone(&projection),
                Arc::clone(&start),
                id.clone(),
            );
            redrives.push(tokio::spawn(async move {
                start.wait().await;
                tokio::time::sleep(delay).await;
                store.redrive_projection(&projection, ACCOUNT, &id).await
            }));
        }
    }
    let mut consumed = Applied::default();
    for consumer in consumers {
        consumed += consumer.await.unwrap().unwrap();
    }
    let mut redriven: Vec<Redriven> = Vec::new();
    for redrive in redrives {
        if let Some(done) = redrive.await.unwrap().unwrap() {
            redriven.push(done);
        }
    }

    // One re-drive per stream did the work, the other found the stream released.
    assert_eq!(redriven.len(), STREAMS, "{redriven:?}");
    for id in &ids {
        let got = applied(&db, id).await;
        let expected = fold(&db, id).await;
        assert_eq!(expected.len(), EVENTS as usize);
        assert_eq!(got, expected, "stream {id}: every event once, in order");
        assert_eq!(checkpoint(&db, NAME, id).await, Some((EVENTS, false)));
    }
    assert!(db.store.parked_streams(None).await.unwrap().is_empty());
    // 2 per stream before the race, then the consumer's and the re-drives' shares.
    let redriven_total: u64 = redriven.iter().map(|r| r.applied).sum();
    assert_eq!(
        2 * STREAMS as u64 + consumed.applied as u64 + redriven_total,
        STREAMS as u64 * EVENTS as u64,
        "consumer {consumed:?}, re-drives {redriven:?}"
    );
    assert_eq!(
        consumed.duplicates + consumed.held + consumed.applied,
        STREAMS * 30
    );
    assert_eq!(
        projection.calls.load(Ordering::SeqCst),
        STREAMS * EVENTS as usize,
        "the projection saw every event once"
    );
}
