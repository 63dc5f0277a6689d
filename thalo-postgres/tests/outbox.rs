//! The outbox as a publisher sees it (`PgOutbox`): leadership and epochs, fencing of a
//! deposed leader, fetch order, parking, retry and skip, lag; and the append-time size
//! limit (`max_event_bytes`) that keeps unpublishable events out of the outbox.

mod common;

use std::time::Duration;

use common::{deposits, new_id, Account, AccountEvent, Note, NoteEvent, TestDb, WrittenEvent};
use sqlx::postgres::PgListener;
use thalo::{AggregateType, Error, Event, EventEnvelope, EventStore, Metadata};
use thalo_postgres::{
    GroupCommit, OutboxEntry, OutboxLag, OutboxLeader, PgEventStoreBuilder, PgOutbox,
};

const ACCOUNT: &str = <Account as AggregateType>::TYPE;

fn no_metadata() -> Metadata {
    Metadata::default()
}

/// Appends deposits of 1, 2, ... `count` to `id`, after `version` events.
async fn append_deposits(
    db: &TestDb,
    id: &str,
    version: u64,
    count: i64,
) -> Vec<EventEnvelope<AccountEvent>> {
    db.store
        .append::<Account>(&id.to_owned(), version, deposits(1..=count), &no_metadata())
        .await
        .expect("append deposits")
}

/// The outbox rows, `(id, position)`, in outbox order.
async fn outbox_rows(db: &TestDb) -> Vec<(i64, i64)> {
    sqlx::query_as(&format!(
        "SELECT id, position FROM {} ORDER BY id",
        db.table("outbox")
    ))
    .fetch_all(&db.pool)
    .await
    .expect("read the outbox")
}

async fn count(db: &TestDb, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table(table)))
        .fetch_one(&db.pool)
        .await
        .expect("count rows")
}

/// One `parking_log` row: consumer, aggregate id, action, sequence, position, detail.
type LogRow = (
    Option<String>,
    String,
    String,
    Option<i64>,
    Option<i64>,
    String,
);

async fn parking_log(db: &TestDb) -> Vec<LogRow> {
    sqlx::query_as(&format!(
        "SELECT consumer, aggregate_id, action, sequence, position, detail FROM {} ORDER BY id",
        db.table("parking_log")
    ))
    .fetch_all(&db.pool)
    .await
    .expect("read parking_log")
}

/// The backend holding the outbox lock of `db`'s schema, if any: the advisory lock key is
/// `hashtextextended('thalo_kafka.relay.<schema>.outbox', 0)`, which Postgres shows split
/// into `classid` (high 32 bits) and `objid` (low 32 bits). Only this schema's lock is
/// matched, so tests running in parallel do not see each other's leaders.
async fn leader_pid(db: &TestDb) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks \
         WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND ((classid::int8 << 32) | objid::int8) = hashtextextended($1, 0)",
    )
    .bind(format!("thalo_kafka.relay.{}.outbox", db.schema))
    .fetch_optional(&db.pool)
    .await
    .expect("read pg_locks")
}

/// Claims the outbox, retrying until the previous leader's session has ended.
async fn claim_within(outbox: &PgOutbox, holder: &str, timeout: Duration) -> OutboxLeader {
    let stop = tokio::time::sleep(timeout);
    outbox
        .claim(holder, Duration::from_millis(10), stop)
        .await
        .expect("claim")
        .unwrap_or_else(|| panic!("`{holder}` did not get the outbox within {timeout:?}"))
}

/// The error and all its causes, for assertions on messages.
fn error_chain(err: &Error) -> String {
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// `(aggregate id, sequence)` of fetched entries.
fn streams(entries: &[OutboxEntry]) -> Vec<(String, u64)> {
    entries
        .iter()
        .map(|e| (e.envelope.aggregate_id.clone(), e.envelope.sequence))
        .collect()
}

fn expected_streams(id: &str, sequences: impl IntoIterator<Item = u64>) -> Vec<(String, u64)> {
    sequences.into_iter().map(|s| (id.to_owned(), s)).collect()
}

/// The entry of `id`'s event `sequence` among `entries`.
fn entry<'a>(entries: &'a [OutboxEntry], id: &str, sequence: u64) -> &'a OutboxEntry {
    entries
        .iter()
        .find(|e| e.envelope.aggregate_id == id && e.envelope.sequence == sequence)
        .unwrap_or_else(|| panic!("no outbox entry for {id} #{sequence}"))
}

// --- Leadership ------------------------------------------------------------------------

#[tokio::test]
async fn every_claim_takes_a_higher_epoch() {
    let db = common::store().await;
    let outbox = db.store.outbox();
    assert_eq!(outbox.leader().await.unwrap(), None, "no one ever led");

    let first = claim_within(&outbox, "relay-1", Duration::from_secs(5)).await;
    assert_eq!(first.epoch(), 1);
    let info = outbox.leader().await.unwrap().expect("a leader");
    assert_eq!((info.epoch, info.holder.as_str()), (1, "relay-1"));
    first.release().await.unwrap();
    assert_eq!(leader_pid(&db).await, None, "release frees the lock");

    let second = outbox.try_claim("relay-2").await.unwrap().expect("free");
    assert_eq!(second.epoch(), 2);
    let info = outbox.leader().await.unwrap().expect("a leader");
    assert_eq!((info.epoch, info.holder.as_str()), (2, "relay-2"));
    second.release().await.unwrap();

    // Dropping a leader closes its session, which frees the lock too.
    let third = claim_within(&outbox, "relay-3", Duration::from_secs(5)).await;
    assert_eq!(third.epoch(), 3);
    drop(third);
    let fourth = claim_within(&outbox, "relay-4", Duration::from_secs(10)).await;
    assert_eq!(fourth.epoch(), 4);
    fourth.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_publisher_leads_and_the_others_stand_by() {
    let db = common::store().await;
    let outbox = db.store.outbox();
    let mut leader = outbox.try_claim("relay-1").await.unwrap().expect("free");
    assert_eq!(leader.epoch(), 1);
    assert!(leader_pid(&db).await.is_some());

    // A second publisher, of the same store or another handle on it, gets nothing.
    assert!(outbox.try_claim("relay-2").await.unwrap().is_none());
    let other = db.store.outbox();
    assert!(other.try_claim("relay-2").await.unwrap().is_none());
    // Standing by until `stop` resolves: no leadership, no epoch taken.
    let stood_by = other
        .claim(
            "relay-2",
            Duration::from_millis(20),
            tokio::time::sleep(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    assert!(stood_by.is_none());
    leader.check().await.expect("still the leader");
    assert_eq!(outbox.leader().await.unwrap().unwrap().epoch, 1);

    // A standing-by publisher takes over as soon as the leader lets go.
    let standby = tokio::spawn(async move {
        other
            .claim("relay-2", Duration::from_millis(20), std::future::pending())
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!standby.is_finished(), "it must wait for the leader");
    leader.release().await.unwrap();
    let mut successor = tokio::time::timeout(Duration::from_secs(10), standby)
        .await
        .expect("the standby takes over")
        .unwrap()
        .unwrap()
        .expect("leadership");
    assert_eq!(successor.epoch(), 2);
    successor.check().await.unwrap();
    assert_eq!(
        outbox.leader().await.unwrap().unwrap().holder,
        "relay-2".to_owned()
    );
    successor.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_session_is_terminated_is_deposed() {
    let db = common::store().await;
    let id = new_id();
    append_deposits(&db, &id, 0, 3).await;
    let outbox = db.store.outbox();
    assert!(!outbox.is_led().await.unwrap(), "no relay yet");
    let mut old = outbox.try_claim("relay-1").await.unwrap().expect("free");
    assert_eq!(old.epoch(), 1);
    assert!(outbox.is_led().await.unwrap());
    let fetched = old.fetch(100, &[]).await.unwrap();
    assert_eq!(fetched.len(), 3);

    let pid = leader_pid(&db).await.expect("the leader holds the lock");
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(terminated);

    let err = old.check().await.expect_err("the session is gone");
    assert!(matches!(err, Error::Store { .. }), "{err:?}");

    // The lock went with the session: another publisher leads, with a higher epoch.
    let mut new = claim_within(&outbox, "relay-2", Duration::from_secs(10)).await;
    assert_eq!(new.epoch(), 2);
    assert_ne!(leader_pid(&db).await, Some(pid));
    new.check().await.unwrap();

    // The deposed leader cannot delete anything: its rows stay for the new one.
    let ids: Vec<i64> = fetched.iter().map(|e| e.id).collect();
    assert!(old.acknowledge(&ids).await.is_err());
    assert!(old.check().await.is_err(), "deposed for good");
    assert_eq!(outbox_rows(&db).await.len(), 3);
    let again = new.fetch(100, &[]).await.unwrap();
    assert_eq!(again.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    assert_eq!(new.acknowledge(&ids).await.unwrap(), 3);
    assert!(outbox_rows(&db).await.is_empty());
    new.release().await.unwrap();
    assert!(!outbox.is_led().await.unwrap(), "released");
}

#[tokio::test]
async fn a_superseded_epoch_fails_its_check_and_acknowledges_nothing() {
    let db = common::store().await;
    let id = new_id();
    append_deposits(&db, &id, 0, 4).await;
    let outbox = db.store.outbox();
    let mut stale = outbox.try_claim("relay-1").await.unwrap().expect("free");
    stale.check().await.unwrap();
    let fetched = stale.fetch(100, &[]).await.unwrap();
    let ids: Vec<i64> = fetched.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 4);

    // A later leader took a newer epoch (as one would after a network partition in
    // which this session survived).
    sqlx::query(&format!(
        "UPDATE {} SET epoch = epoch + 1",
        db.table("outbox_leader")
    ))
    .execute(&db.pool)
    .await
    .unwrap();

    let err = stale.check().await.expect_err("the epoch moved on");
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
    assert!(
        error_chain(&err).contains("epoch 1 was superseded (current: 2)"),
        "{}",
        error_chain(&err)
    );
    assert_eq!(
        stale.acknowledge(&ids).await.unwrap(),
        0,
        "a stale leader deletes nothing"
    );
    assert_eq!(outbox_rows(&db).await.len(), 4);
    assert_eq!(stale.acknowledge(&[]).await.unwrap(), 0);

    // The next leader's epoch is above the bumped one, and it can acknowledge.
    stale.release().await.unwrap();
    let mut next = outbox.try_claim("relay-2").await.unwrap().expect("free");
    assert_eq!(next.epoch(), 3);
    next.check().await.unwrap();
    assert_eq!(next.acknowledge(&ids[..2]).await.unwrap(), 2);
    assert_eq!(
        outbox_rows(&db)
            .await
            .iter()
            .map(|r| r.0)
            .collect::<Vec<_>>(),
        ids[2..]
    );
    next.release().await.unwrap();
}

// --- Fetch -------------------------------------------------------------------------------

#[tokio::test]
async fn fetch_follows_outbox_order_and_leaves_out_parked_and_held_back_aggregates() {
    let db = common::store().await;
    let (a, b, c) = (
        format!("a-{}", new_id()),
        format!("b-{}", new_id()),
        format!("c-{}", new_id()),
    );
    // Interleaved, so that outbox order is not aggregate order.
    let mut appended = append_deposits(&db, &a, 0, 25).await;
    appended.extend(append_deposits(&db, &b, 0, 3).await);
    appended.extend(
        db.store
            .append::<Account>(&a, 25, deposits(26..=50), &no_metadata())
            .await
            .unwrap(),
    );
    appended.extend(append_deposits(&db, &c, 0, 3).await);
    assert_eq!(appended.len(), 56);

    let outbox = db.store.outbox();
    let mut leader = outbox.try_claim("relay").await.unwrap().expect("free");
    let all = leader.fetch(1000, &[]).await.unwrap();
    let rows = outbox_rows(&db).await;
    assert_eq!(
        all.iter()
            .map(|e| (e.id, e.envelope.position as i64))
            .collect::<Vec<_>>(),
        rows,
        "every row, in outbox order"
    );
    assert_eq!(
        all.iter()
            .map(|e| (e.envelope.aggregate_id.clone(), e.envelope.sequence))
            .collect::<Vec<_>>(),
        appended
            .iter()
            .map(|e| (e.aggregate_id.clone(), e.sequence))
            .collect::<Vec<_>>(),
        "in append order"
    );
    for (entry, stored) in all.iter().zip(&appended) {
        assert_eq!(entry.envelope.id, stored.id);
        assert_eq!(entry.envelope.position, stored.position);
        let decoded: AccountEvent = entry.envelope.event.decode().unwrap();
        assert_eq!(decoded.encode().unwrap(), stored.event.encode().unwrap());
    }
    // A limit takes the oldest rows.
    assert_eq!(
        streams(&leader.fetch(10, &[]).await.unwrap()),
        expected_streams(&a, 1..=10)
    );

    // Held back by the caller: A's 50 rows never take the place of B's and C's.
    let hold_a = [(ACCOUNT.to_owned(), a.clone())];
    let mut others = expected_streams(&b, 1..=3);
    others.extend(expected_streams(&c, 1..=3));
    assert_eq!(streams(&leader.fetch(10, &hold_a).await.unwrap()), others);
    let hold_a_b = [
        (ACCOUNT.to_owned(), a.clone()),
        (ACCOUNT.to_owned(), b.clone()),
    ];
    assert_eq!(
        streams(&leader.fetch(2, &hold_a_b).await.unwrap()),
        expected_streams(&c, 1..=2)
    );
    // An unknown aggregate held back changes nothing.
    assert_eq!(
        leader
            .fetch(1000, &[("nope".to_owned(), a.clone())])
            .await
            .unwrap()
            .len(),
        56
    );

    // Parked: the same, with no hold-back list.
    leader
        .park(entry(&all, &a, 1), "message too large")
        .await
        .unwrap();
    assert_eq!(streams(&leader.fetch(10, &[]).await.unwrap()), others);
    let hold_b = [(ACCOUNT.to_owned(), b.clone())];
    assert_eq!(
        streams(&leader.fetch(10, &hold_b).await.unwrap()),
        expected_streams(&c, 1..=3)
    );
    let hold_b_c = [
        (ACCOUNT.to_owned(), b.clone()),
        (ACCOUNT.to_owned(), c.clone()),
    ];
    assert!(leader.fetch(10, &hold_b_c).await.unwrap().is_empty());
    leader.release().await.unwrap();
}

// --- Park, retry, skip, lag ----------------------------------------------------------

#[tokio::test]
async fn parking_is_recorded_once_and_listed_with_its_waiting_rows() {
    let db = common::store().await;
    let (a, b) = (format!("a-{}", new_id()), format!("b-{}", new_id()));
    append_deposits(&db, &a, 0, 5).await;
    append_deposits(&db, &b, 0, 2).await;
    let outbox = db.store.outbox();
    assert_eq!(outbox.lag().await.unwrap().parked, 0);
    let mut leader = outbox.try_claim("relay").await.unwrap().expect("free");
    let all = leader.fetch(100, &[]).await.unwrap();

    // A's first two events were published; the broker refuses the third for good.
    let published = [entry(&all, &a, 1).id, entry(&all, &a, 2).id];
    assert_eq!(leader.acknowledge(&published).await.unwrap(), 2);
    let refused = entry(&all, &a, 3);
    leader
        .park(refused, "MessageSizeTooLarge: 1.2 MB > 1 MB")
        .await
        .unwrap();

    let parked_rows: Vec<(String, i64, i64, i64, String)> = sqlx::query_as(&format!(
        "SELECT aggregate_id, outbox_id, position, sequence, error FROM {}",
        db.table("outbox_parked")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        parked_rows,
        [(
            a.clone(),
            refused.id,
            refused.envelope.position as i64,
            3,
            "MessageSizeTooLarge: 1.2 MB > 1 MB".to_owned()
        )]
    );
    let parked_log = (
        None,
        a.clone(),
        "parked".to_owned(),
        Some(3),
        Some(refused.envelope.position as i64),
        "MessageSizeTooLarge: 1.2 MB > 1 MB".to_owned(),
    );
    assert_eq!(parking_log(&db).await, std::slice::from_ref(&parked_log));

    // Parking again (the same event, or a later one of the same aggregate) is a no-op:
    // the aggregate stays parked at the first refused event, logged once.
    leader.park(refused, "refused again").await.unwrap();
    leader
        .park(entry(&all, &a, 4), "a later one")
        .await
        .unwrap();
    assert_eq!(count(&db, "outbox_parked").await, 1);
    assert_eq!(parking_log(&db).await, [parked_log]);

    let parked = outbox.parked().await.unwrap();
    assert_eq!(parked.len(), 1);
    let p = &parked[0];
    assert_eq!(
        (
            p.aggregate_type.as_str(),
            p.aggregate_id.as_str(),
            p.outbox_id,
            p.position,
            p.sequence,
            p.error.as_str(),
            p.waiting
        ),
        (
            ACCOUNT,
            a.as_str(),
            refused.id,
            refused.envelope.position,
            3,
            "MessageSizeTooLarge: 1.2 MB > 1 MB",
            3
        ),
        "{p:?}"
    );
    assert!(p.parked_at <= chrono::Utc::now());

    // B goes on.
    assert_eq!(
        streams(&leader.fetch(100, &[]).await.unwrap()),
        expected_streams(&b, 1..=2)
    );
    let lag = outbox.lag().await.unwrap();
    assert_eq!((lag.pending, lag.parked), (5, 1), "{lag:?}");
    leader.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_releases_a_parked_aggregate_in_order() {
    let db = common::store().await;
    let (a, b) = (format!("a-{}", new_id()), format!("b-{}", new_id()));
    append_deposits(&db, &a, 0, 3).await;
    append_deposits(&db, &b, 0, 2).await;
    db.store
        .append::<Account>(&a, 3, deposits([4, 5]), &no_metadata())
        .await
        .unwrap();
    let outbox = db.store.outbox();
    let mut leader = outbox.try_claim("relay").await.unwrap().expect("free");
    let all = leader.fetch(100, &[]).await.unwrap();
    let refused = entry(&all, &a, 2).clone();
    assert_eq!(
        leader.acknowledge(&[entry(&all, &a, 1).id]).await.unwrap(),
        1
    );
    leader.park(&refused, "topic not authorised").await.unwrap();
    // B is published meanwhile.
    let b_ids: Vec<i64> = leader
        .fetch(100, &[])
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(b_ids.len(), 2);
    assert_eq!(leader.acknowledge(&b_ids).await.unwrap(), 2);
    assert!(leader.fetch(100, &[]).await.unwrap().is_empty());

    // A retry wakes the publisher, which listens on the store's channel.
    let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen(outbox.channel()).await.unwrap();
    assert!(outbox.retry(ACCOUNT, &a).await.unwrap());
    let notification = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("the retry notifies the channel")
        .unwrap();
    assert_eq!(notification.channel(), db.store.notify_channel());

    let log = parking_log(&db).await;
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(
        log[1],
        (
            None,
            a.clone(),
            "retried".to_owned(),
            Some(2),
            Some(refused.envelope.position as i64),
            String::new()
        )
    );
    assert!(outbox.parked().await.unwrap().is_empty());
    assert_eq!(outbox.lag().await.unwrap().parked, 0);

    // A's rows come back in order, from the refused one on.
    let again = leader.fetch(100, &[]).await.unwrap();
    assert_eq!(streams(&again), expected_streams(&a, 2..=5));
    assert_eq!(again[0].id, refused.id);

    // Retrying an aggregate that is not parked does nothing.
    assert!(!outbox.retry(ACCOUNT, &a).await.unwrap());
    assert!(!outbox.retry(ACCOUNT, "never-parked").await.unwrap());
    assert_eq!(parking_log(&db).await.len(), 2);
    leader.release().await.unwrap();
}

#[tokio::test]
async fn skip_drops_exactly_the_refused_row_and_releases_the_aggregate() {
    let db = common::store().await;
    let (a, b) = (format!("a-{}", new_id()), format!("b-{}", new_id()));
    append_deposits(&db, &a, 0, 5).await;
    append_deposits(&db, &b, 0, 2).await;
    let outbox = db.store.outbox();
    let mut leader = outbox.try_claim("relay").await.unwrap().expect("free");
    let all = leader.fetch(100, &[]).await.unwrap();
    let published = [entry(&all, &a, 1).id, entry(&all, &a, 2).id];
    assert_eq!(leader.acknowledge(&published).await.unwrap(), 2);
    let refused = entry(&all, &a, 3).clone();
    leader.park(&refused, "invalid record").await.unwrap();
    let events_before = count(&db, "events").await;
    let rows_before = outbox_rows(&db).await;

    let skipped = outbox
        .skip(ACCOUNT, &a, "ticket OPS-42: payload is unfixable")
        .await
        .unwrap();
    let skipped = skipped.expect("the aggregate was parked");
    assert_eq!(
        (
            skipped.aggregate_type.as_str(),
            skipped.aggregate_id.as_str(),
            skipped.position,
            skipped.sequence
        ),
        (ACCOUNT, a.as_str(), refused.envelope.position, 3)
    );
    // Exactly the refused row left the outbox; the event stays in the store.
    let expected_rows: Vec<(i64, i64)> = rows_before
        .iter()
        .copied()
        .filter(|(id, _)| *id != refused.id)
        .collect();
    assert_eq!(expected_rows.len(), rows_before.len() - 1);
    assert_eq!(outbox_rows(&db).await, expected_rows);
    assert_eq!(count(&db, "events").await, events_before);
    assert_eq!(count(&db, "outbox_parked").await, 0);
    assert!(outbox.parked().await.unwrap().is_empty());
    let log = parking_log(&db).await;
    assert_eq!(
        log.last().unwrap(),
        &(
            None,
            a.clone(),
            "skipped".to_owned(),
            Some(3),
            Some(refused.envelope.position as i64),
            "ticket OPS-42: payload is unfixable".to_owned()
        ),
        "{log:?}"
    );
    assert_eq!(log.len(), 2);

    // The aggregate's later events are published next, in outbox order.
    let mut expected = expected_streams(&a, 4..=5);
    expected.extend(expected_streams(&b, 1..=2));
    assert_eq!(streams(&leader.fetch(100, &[]).await.unwrap()), expected);
    let hold_b = [(ACCOUNT.to_owned(), b.clone())];
    assert_eq!(
        streams(&leader.fetch(100, &hold_b).await.unwrap()),
        expected_streams(&a, 4..=5)
    );

    // Skipping an aggregate that is not parked does nothing.
    assert_eq!(outbox.skip(ACCOUNT, &a, "again").await.unwrap(), None);
    assert_eq!(parking_log(&db).await.len(), 2);
    assert_eq!(outbox_rows(&db).await, expected_rows);
    leader.release().await.unwrap();
}

#[tokio::test]
async fn lag_counts_pending_rows_their_age_and_parked_aggregates() {
    let db = common::store().await;
    let outbox = db.store.outbox();
    assert_eq!(outbox.lag().await.unwrap(), OutboxLag::default());

    let (a, b) = (format!("a-{}", new_id()), format!("b-{}", new_id()));
    append_deposits(&db, &a, 0, 4).await;
    append_deposits(&db, &b, 0, 3).await;
    let lag = outbox.lag().await.unwrap();
    assert_eq!((lag.pending, lag.parked), (7, 0));
    let age = lag.oldest_age.expect("rows wait");
    assert!(age < Duration::from_secs(60), "{age:?}");

    let mut leader = outbox.try_claim("relay").await.unwrap().expect("free");
    let all = leader.fetch(100, &[]).await.unwrap();
    leader.park(entry(&all, &a, 1), "refused").await.unwrap();
    let b_ids: Vec<i64> = all
        .iter()
        .filter(|e| e.envelope.aggregate_id == b)
        .map(|e| e.id)
        .collect();
    assert_eq!(leader.acknowledge(&b_ids).await.unwrap(), 3);
    let lag = outbox.lag().await.unwrap();
    assert_eq!(
        (lag.pending, lag.parked),
        (4, 1),
        "parked rows still count as pending"
    );
    assert!(lag.oldest_age.is_some());

    assert_eq!(
        outbox
            .skip(ACCOUNT, &a, "drop it")
            .await
            .unwrap()
            .map(|s| s.sequence),
        Some(1)
    );
    let rest: Vec<i64> = leader
        .fetch(100, &[])
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(rest.len(), 3);
    assert_eq!(leader.acknowledge(&rest).await.unwrap(), 3);
    assert_eq!(outbox.lag().await.unwrap(), OutboxLag::default());
    leader.release().await.unwrap();
}

// --- max_event_bytes ---------------------------------------------------------------

/// A note event whose payload plus `metadata` is exactly `size` bytes.
fn note_of_size(size: usize, metadata: &Metadata) -> NoteEvent {
    let overhead = payload_len(
        &WrittenEvent {
            text: String::new(),
        }
        .into(),
    ) + metadata_len(metadata);
    let event: NoteEvent = WrittenEvent {
        text: "x".repeat(size - overhead),
    }
    .into();
    assert_eq!(payload_len(&event) + metadata_len(metadata), size);
    event
}

fn payload_len(event: &NoteEvent) -> usize {
    event.encode().expect("encode").len()
}

fn metadata_len(metadata: &Metadata) -> usize {
    serde_json::to_string(metadata).expect("metadata").len()
}

fn note(text: &str) -> NoteEvent {
    WrittenEvent { text: text.into() }.into()
}

/// Events and outbox rows, to show that a refused append stored nothing.
async fn stored_counts(db: &TestDb) -> (i64, i64) {
    (count(db, "events").await, count(db, "outbox").await)
}

fn assert_too_large(err: &Error, id: &str, expected_size: usize, expected_limit: usize) {
    match err {
        Error::EventTooLarge {
            aggregate_type,
            aggregate_id,
            event_type,
            size,
            limit,
        } => {
            assert_eq!(aggregate_type, <Note as AggregateType>::TYPE);
            assert_eq!(aggregate_id, id);
            assert_eq!(event_type, note("").event_type());
            assert_eq!((*size, *limit), (expected_size, expected_limit));
        }
        other => panic!("expected EventTooLarge, got {other:?}"),
    }
}

const LIMIT: usize = 512;

#[tokio::test]
async fn an_append_with_an_event_over_the_limit_stores_nothing() {
    let db = common::store_with(4, |b| b.max_event_bytes(LIMIT)).await;
    let id = format!("note-{}", new_id());
    let metadata = no_metadata();

    // At the limit is fine.
    let stored = db
        .store
        .append::<Note>(
            &id,
            0,
            vec![note("first"), note_of_size(LIMIT, &metadata)],
            &metadata,
        )
        .await
        .expect("an event of exactly the limit is stored");
    assert_eq!(stored.len(), 2);
    let before = stored_counts(&db).await;
    assert_eq!(before, (2, 2));

    // One byte over: the whole append is refused, the small event with it.
    let err = db
        .store
        .append::<Note>(
            &id,
            2,
            vec![note("small"), note_of_size(LIMIT + 1, &metadata)],
            &metadata,
        )
        .await
        .expect_err("over the limit");
    assert_too_large(&err, &id, LIMIT + 1, LIMIT);
    assert!(
        err.to_string().contains(&format!("{} bytes", LIMIT + 1)),
        "{err}"
    );
    assert_eq!(stored_counts(&db).await, before);
    assert_eq!(db.store.load::<Note>(&id).await.unwrap().version, 2);

    // Metadata counts: a payload that fits alone is refused with large metadata.
    let heavy = Metadata::default().with_header("trace", "t".repeat(100));
    let event = note_of_size(LIMIT - 50, &no_metadata());
    let size = payload_len(&event) + metadata_len(&heavy);
    assert!(size > LIMIT);
    let err = db
        .store
        .append::<Note>(&id, 2, vec![event.clone()], &heavy)
        .await
        .expect_err("payload and metadata over the limit");
    assert_too_large(&err, &id, size, LIMIT);
    assert_eq!(stored_counts(&db).await, before);

    // Just under the limit, with the same metadata, is stored.
    let fits = note_of_size(LIMIT - 1, &heavy);
    let stored = db
        .store
        .append::<Note>(&id, 2, vec![fits], &heavy)
        .await
        .expect("just under the limit");
    assert_eq!(stored[0].sequence, 3);
    assert_eq!(stored_counts(&db).await, (3, 3));

    // Repository commands go through the same check.
    let repo = thalo::Repository::new(db.store.clone());
    let err = repo
        .execute::<Note>(
            &id,
            common::NoteCommand::Write {
                text: "y".repeat(LIMIT),
            },
        )
        .await
        .expect_err("a command producing a too large event");
    assert!(matches!(err, Error::EventTooLarge { .. }), "{err:?}");
    assert_eq!(stored_counts(&db).await, (3, 3));
}

#[tokio::test]
async fn append_in_refuses_an_event_over_the_limit_and_keeps_the_transaction() {
    let db = common::store_with(4, |b| b.max_event_bytes(LIMIT)).await;
    let id = format!("note-{}", new_id());
    let metadata = no_metadata();
    let mut tx = db.pool.begin().await.unwrap();
    let err = db
        .store
        .append_in::<Note>(
            &mut tx,
            &id,
            0,
            vec![note("small"), note_of_size(LIMIT + 1, &metadata)],
            &metadata,
        )
        .await
        .expect_err("over the limit");
    assert_too_large(&err, &id, LIMIT + 1, LIMIT);
    // The caller's transaction is still usable, and what it appends next commits.
    let stored = db
        .store
        .append_in::<Note>(
            &mut tx,
            &id,
            0,
            vec![note_of_size(LIMIT, &metadata)],
            &metadata,
        )
        .await
        .expect("at the limit");
    assert_eq!(stored.len(), 1);
    tx.commit().await.unwrap();
    assert_eq!(stored_counts(&db).await, (1, 1));
    let loaded = db.store.load::<Note>(&id).await.unwrap();
    assert_eq!(loaded.version, 1);
    assert_eq!(
        loaded.aggregate.text.len(),
        LIMIT - payload_len(&note("")) - metadata_len(&metadata)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_refuses_an_event_over_the_limit_alone() {
    let db = common::store_with(8, |b| {
        b.max_event_bytes(LIMIT)
            .group_commit(GroupCommit::default())
    })
    .await;
    assert!(db.store.group_commit().is_some());
    let metadata = no_metadata();
    let (big, small) = (format!("big-{}", new_id()), format!("small-{}", new_id()));

    let (refused, stored) = tokio::join!(
        db.store.append::<Note>(
            &big,
            0,
            vec![note("fine"), note_of_size(LIMIT + 1, &metadata)],
            &metadata,
        ),
        db.store.append::<Note>(
            &small,
            0,
            vec![note("a"), note_of_size(LIMIT, &metadata)],
            &metadata,
        ),
    );
    assert_too_large(
        &refused.expect_err("over the limit"),
        &big,
        LIMIT + 1,
        LIMIT,
    );
    assert_eq!(stored.expect("the other append is stored").len(), 2);
    assert_eq!(stored_counts(&db).await, (2, 2));
    assert_eq!(db.store.load::<Note>(&big).await.unwrap().version, 0);
    assert_eq!(db.store.load::<Note>(&small).await.unwrap().version, 2);
}

#[tokio::test]
async fn the_default_limit_is_default_max_event_bytes() {
    let db = common::store().await;
    let limit = PgEventStoreBuilder::DEFAULT_MAX_EVENT_BYTES;
    let metadata = no_metadata();
    let id = format!("note-{}", new_id());
    let err = db
        .store
        .append::<Note>(&id, 0, vec![note_of_size(limit + 1, &metadata)], &metadata)
        .await
        .expect_err("over the default limit");
    assert_too_large(&err, &id, limit + 1, limit);
    assert_eq!(stored_counts(&db).await, (0, 0));

    let stored = db
        .store
        .append::<Note>(&id, 0, vec![note_of_size(limit, &metadata)], &metadata)
        .await
        .expect("at the default limit");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored_counts(&db).await, (1, 1));

    // `usize::MAX` turns the check off.
    let unlimited = common::store_with(2, |b| b.max_event_bytes(usize::MAX)).await;
    unlimited
        .store
        .append::<Note>(&id, 0, vec![note_of_size(limit + 1, &metadata)], &metadata)
        .await
        .expect("no limit");
    assert_eq!(stored_counts(&unlimited).await, (1, 1));
}
