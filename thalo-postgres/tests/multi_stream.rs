//! Multi-stream projections: a `PgSubscription` over an event set of two aggregate types
//! builds a view keyed by owner, not by aggregate, exactly once across a crash.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Note, WrittenEvent};
use sqlx::PgConnection;
use thalo::{
    commands, events, Aggregate, CheckpointStore, Error, EventEnvelope, EventSet, EventStore,
    Metadata,
};
use thalo_postgres::{PgProjection, PgSubscription};

/// An account that belongs to an owner.
#[derive(Aggregate, Clone, Debug, Default)]
#[aggregate(name = "ms_account")]
pub struct OwnedAccount {
    #[identity]
    id: String,
}

#[commands]
impl OwnedAccount {
    pub fn open(&self, owner: String) -> Result<OpenedEvent, Error> {
        Ok(OpenedEvent { owner })
    }

    pub fn deposit(&self, cents: i64) -> Result<DepositedEvent, Error> {
        Ok(DepositedEvent { cents })
    }
}

#[events]
impl OwnedAccount {
    pub fn opened(&mut self, owner: String) {
        let _ = owner;
    }

    pub fn deposited(&mut self, cents: i64) {
        let _ = cents;
    }
}

/// A card charged to its owner. Its events are stored under the same type names as the
/// account's, so only the aggregate type tells them apart.
#[derive(Aggregate, Clone, Debug, Default)]
#[aggregate(name = "ms_card")]
pub struct Card {
    #[identity]
    id: String,
}

#[commands]
impl Card {
    pub fn issue(&self, owner: String) -> Result<IssuedEvent, Error> {
        Ok(IssuedEvent { owner })
    }

    pub fn charge(&self, cents: i64) -> Result<ChargedEvent, Error> {
        Ok(ChargedEvent { cents })
    }
}

#[events]
impl Card {
    #[event(name = "Opened")]
    pub fn issued(&mut self, owner: String) {
        let _ = owner;
    }

    #[event(name = "Deposited")]
    pub fn charged(&mut self, cents: i64) {
        let _ = cents;
    }
}

thalo::event_set! {
    /// What the per-owner view reads.
    pub enum OwnerEvent {
        Account(OwnedAccount),
        Card(Card),
    }
}

/// Net money per owner (deposits minus card charges) and how many money events made it,
/// in `<schema>.per_owner`; which owner each account and card belongs to, in
/// `<schema>.owners`. Fails on the `fail_on`-th call (from 1) when set.
struct PerOwner {
    link: String,
    add: String,
    calls: AtomicUsize,
    fail_on: Option<usize>,
}

impl PerOwner {
    async fn new(db: &common::TestDb) -> Self {
        let (owners, per_owner) = (db.table("owners"), db.table("per_owner"));
        for ddl in [
            format!(
                "CREATE TABLE IF NOT EXISTS {owners} (aggregate_type TEXT, aggregate_id TEXT, \
                 owner TEXT NOT NULL, PRIMARY KEY (aggregate_type, aggregate_id))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {per_owner} (owner TEXT PRIMARY KEY, \
                 cents BIGINT NOT NULL, events BIGINT NOT NULL)"
            ),
        ] {
            sqlx::query(&ddl).execute(&db.pool).await.unwrap();
        }
        PerOwner {
            link: format!(
                "INSERT INTO {owners} (aggregate_type, aggregate_id, owner) VALUES ($1, $2, $3)"
            ),
            // Plain INSERT above: linking an aggregate twice (an event applied twice)
            // would fail the test with a unique violation.
            add: format!(
                "INSERT INTO {per_owner} AS p (owner, cents, events)
                 SELECT owner, $3, 1 FROM {owners} WHERE aggregate_type = $1 AND aggregate_id = $2
                 ON CONFLICT (owner) DO UPDATE SET cents = p.cents + EXCLUDED.cents, events = p.events + 1"
            ),
            calls: AtomicUsize::new(0),
            fail_on: None,
        }
    }

    fn failing_on(mut self, call: usize) -> Self {
        self.fail_on = Some(call);
        self
    }
}

#[derive(Debug, thiserror::Error)]
#[error("simulated crash")]
struct Crash;

impl PgProjection<OwnerEvent> for PerOwner {
    fn name(&self) -> &str {
        "per_owner"
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<OwnerEvent>,
    ) -> Result<(), Error> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.fail_on == Some(call) {
            return Err(Error::handler("per_owner", Crash));
        }
        let (query, value) = match &envelope.event {
            OwnerEvent::Account(OwnedAccountEvent::Opened(e)) => (&self.link, Err(&e.owner)),
            OwnerEvent::Card(CardEvent::Issued(e)) => (&self.link, Err(&e.owner)),
            OwnerEvent::Account(OwnedAccountEvent::Deposited(e)) => (&self.add, Ok(e.cents)),
            OwnerEvent::Card(CardEvent::Charged(e)) => (&self.add, Ok(-e.cents)),
        };
        let query = sqlx::query(query)
            .bind(&envelope.aggregate_type)
            .bind(&envelope.aggregate_id);
        let query = match value {
            Ok(cents) => query.bind(cents),
            Err(owner) => query.bind(owner),
        };
        let done = query
            .execute(tx)
            .await
            .map_err(|e| Error::store("updating per_owner", e))?;
        if done.rows_affected() != 1 {
            // A money event before its aggregate's opening: the view would be wrong.
            return Err(Error::handler(
                "per_owner",
                format!(
                    "{} `{}` has no owner",
                    envelope.aggregate_type, envelope.aggregate_id
                ),
            ));
        }
        Ok(())
    }
}

async fn per_owner(db: &common::TestDb) -> BTreeMap<String, (i64, i64)> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT owner, cents, events FROM {}",
        db.table("per_owner")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(owner, cents, events)| (owner, (cents, events)))
        .collect()
}

/// The per-owner view folded from the store's global log, up to `until` (inclusive):
/// what the projection must equal.
async fn fold(db: &common::TestDb, until: u64) -> BTreeMap<String, (i64, i64)> {
    let mut owners: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut view: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for raw in common::read_everything(&db.store).await {
        if raw.position > until
            || !OwnerEvent::aggregate_types().contains(&raw.aggregate_type.as_str())
        {
            continue;
        }
        let envelope = raw.decode::<OwnerEvent>().unwrap();
        let stream = (
            envelope.aggregate_type.clone(),
            envelope.aggregate_id.clone(),
        );
        let cents = match envelope.event {
            OwnerEvent::Account(OwnedAccountEvent::Opened(e)) => {
                owners.insert(stream, e.owner);
                continue;
            }
            OwnerEvent::Card(CardEvent::Issued(e)) => {
                owners.insert(stream, e.owner);
                continue;
            }
            OwnerEvent::Account(OwnedAccountEvent::Deposited(e)) => e.cents,
            OwnerEvent::Card(CardEvent::Charged(e)) => -e.cents,
        };
        let entry = view.entry(owners[&stream].clone()).or_default();
        entry.0 += cents;
        entry.1 += 1;
    }
    view
}

/// Two owners, each with two accounts and a card, events interleaved across aggregates,
/// and notes (not in the set) in between. Returns the number of events in the set.
async fn seed(db: &common::TestDb) -> usize {
    let meta = Metadata::default();
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    let mut in_set = 0;
    for owner in ["ada", "bo"] {
        for i in 0..2 {
            let id = format!("{owner}-acc-{i}");
            db.store
                .append::<OwnedAccount>(
                    &id,
                    0,
                    vec![OpenedEvent {
                        owner: owner.into(),
                    }
                    .into()],
                    &meta,
                )
                .await
                .unwrap();
            versions.insert(id, 1);
            in_set += 1;
        }
        let card = format!("{owner}-card");
        db.store
            .append::<Card>(
                &card,
                0,
                vec![IssuedEvent {
                    owner: owner.into(),
                }
                .into()],
                &meta,
            )
            .await
            .unwrap();
        versions.insert(card, 1);
        in_set += 1;
    }
    for round in 1..=4_i64 {
        for owner in ["ada", "bo"] {
            for i in 0..2 {
                let id = format!("{owner}-acc-{i}");
                let version = versions[&id];
                db.store
                    .append::<OwnedAccount>(
                        &id,
                        version,
                        vec![DepositedEvent {
                            cents: 100 * round + i,
                        }
                        .into()],
                        &meta,
                    )
                    .await
                    .unwrap();
                versions.insert(id, version + 1);
                in_set += 1;
            }
            let card = format!("{owner}-card");
            let version = versions[&card];
            db.store
                .append::<Card>(
                    &card,
                    version,
                    vec![ChargedEvent { cents: round }.into()],
                    &meta,
                )
                .await
                .unwrap();
            versions.insert(card, version + 1);
            in_set += 1;
        }
        db.store
            .append::<Note>(
                &format!("note-{round}"),
                0,
                vec![WrittenEvent {
                    text: "not in the set".into(),
                }
                .into()],
                &meta,
            )
            .await
            .unwrap();
    }
    // Other tests' open transactions may hold the read horizon back for a moment.
    let total = in_set + 4;
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::read_everything(&db.store).await.len() < total {
        assert!(
            Instant::now() < deadline,
            "the seeded events never became readable"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    in_set
}

#[tokio::test]
async fn a_view_across_aggregates_is_built_exactly_once_across_a_crash() {
    let db = common::store().await;
    let in_set = seed(&db).await;
    assert_eq!(in_set, 6 + 24);
    let last = common::read_everything(&db.store)
        .await
        .last()
        .unwrap()
        .position;

    // Batches of 5 log entries; the 13th handled event fails, in the middle of the third
    // batch: the first two batches stay committed, the third rolls back whole.
    let crashing =
        PgSubscription::new_set(db.store.clone(), PerOwner::new(&db).await.failing_on(13))
            .with_batch_size(5);
    let err = crashing.catch_up().await.expect_err("simulated crash");
    assert!(
        matches!(&err, Error::Handler { handler, .. } if handler == "per_owner"),
        "{err:?}"
    );
    let checkpoint = db.store.load_checkpoint("per_owner").await.unwrap();
    assert_eq!(checkpoint, Some(10), "two batches of five log entries");
    assert_eq!(
        per_owner(&db).await,
        fold(&db, 10).await,
        "the view is the fold of what the checkpoint covers, nothing of the failed batch"
    );
    let partial: i64 = per_owner(&db)
        .await
        .values()
        .map(|(_, events)| events)
        .sum();
    assert!(partial > 0, "the first batches were kept");

    // The restart applies the rest, each event once.
    let restarted =
        PgSubscription::new_set(db.store.clone(), PerOwner::new(&db).await).with_batch_size(5);
    let applied = restarted.catch_up().await.unwrap();
    assert_eq!(applied.duplicates, 0);
    let linked: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table("owners")))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(linked, 6, "every account and card linked once");
    let view = per_owner(&db).await;
    assert_eq!(view, fold(&db, last).await);
    let money_events: i64 = view.values().map(|(_, events)| events).sum();
    assert_eq!(money_events, 24);
    assert_eq!(
        applied.applied,
        in_set - 10,
        "the restart applied what the crash did not commit (the first ten events)"
    );
    assert_eq!(
        db.store.load_checkpoint("per_owner").await.unwrap(),
        Some(last)
    );
    // ada: deposits 100r + 0 and 100r + 1 for r in 1..=4, minus charges 1..=4.
    assert_eq!(view["ada"], (2000 + 4 - 10, 12));

    // Every stream of both types has its own checkpoint at its last sequence.
    let checkpoints: Vec<(String, String, i64)> = sqlx::query_as(&format!(
        "SELECT aggregate_type, aggregate_id, sequence FROM {} ORDER BY 1, 2",
        db.table("stream_checkpoints")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(checkpoints.len(), 6, "{checkpoints:?}");
    assert!(
        checkpoints.iter().all(|(_, _, sequence)| *sequence == 5),
        "{checkpoints:?}"
    );
    assert_eq!(
        checkpoints
            .iter()
            .filter(|(t, _, _)| t == "ms_card")
            .count(),
        2
    );

    // Nothing new: nothing applied; the same batch delivered again is skipped whole.
    assert_eq!(restarted.catch_up().await.unwrap().applied, 0);
    let again: Vec<EventEnvelope<OwnerEvent>> = common::read_everything(&db.store)
        .await
        .iter()
        .filter(|e| OwnerEvent::aggregate_types().contains(&e.aggregate_type.as_str()))
        .map(|e| e.decode().unwrap())
        .collect();
    let replayed = db
        .store
        .apply_exactly_once(restarted.projection(), &again)
        .await
        .unwrap();
    assert_eq!((replayed.applied, replayed.duplicates), (0, in_set));
    assert_eq!(per_owner(&db).await, view);
}

/// Counts the events of every aggregate type, whatever it is: an `AnyEvent` projection.
struct EveryType {
    table: String,
    fail_on: Option<usize>,
    seen: AtomicUsize,
}

impl PgProjection<thalo::AnyEvent> for EveryType {
    fn name(&self) -> &str {
        "every_type"
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<thalo::AnyEvent>,
    ) -> Result<(), Error> {
        if Some(self.seen.fetch_add(1, Ordering::SeqCst) + 1) == self.fail_on {
            return Err(Error::handler("every_type", "simulated crash"));
        }
        sqlx::query(&format!(
            "INSERT INTO {} AS c (aggregate_type, event_type, n) VALUES ($1, $2, 1)
             ON CONFLICT (aggregate_type, event_type) DO UPDATE SET n = c.n + 1",
            self.table
        ))
        .bind(&envelope.aggregate_type)
        .bind(envelope.event.event_type_name())
        .execute(tx)
        .await
        .map_err(|e| Error::store("counting events", e))?;
        Ok(())
    }
}

#[tokio::test]
async fn a_projection_of_every_aggregate_type_counts_each_event_once_across_a_crash() {
    let db = common::store().await;
    let in_set = seed(&db).await;
    let table = db.table("event_counts");
    sqlx::query(&format!(
        "CREATE TABLE {table} (aggregate_type TEXT, event_type TEXT, n BIGINT NOT NULL,
         PRIMARY KEY (aggregate_type, event_type))"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let projection = |fail_on| EveryType {
        table: table.clone(),
        fail_on,
        seen: AtomicUsize::new(0),
    };

    // The 13th event fails in the third batch of five: two batches stay committed.
    let crashing =
        PgSubscription::new_set(db.store.clone(), projection(Some(13))).with_batch_size(5);
    crashing.catch_up().await.expect_err("simulated crash");
    let restarted = PgSubscription::new_set(db.store.clone(), projection(None)).with_batch_size(5);
    let applied = restarted.catch_up().await.unwrap();
    assert_eq!(applied.duplicates, 0);
    // Every event of the log: the set's two types and the notes outside any set.
    assert_eq!(applied.applied, in_set + 4 - 10);

    let counted: Vec<(String, String, i64)> = sqlx::query_as(&format!(
        "SELECT aggregate_type, event_type, n FROM {table} ORDER BY 1, 2"
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let fold: Vec<(String, String, i64)> = sqlx::query_as(&format!(
        "SELECT aggregate_type, event_type, count(*) FROM {} GROUP BY 1, 2 ORDER BY 1, 2",
        db.table("events")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(counted, fold, "each event of every aggregate type, once");
    assert!(counted.iter().any(|(t, _, _)| t == "ms_card"));
    assert!(counted
        .iter()
        .any(|(t, _, _)| t != "ms_card" && t != "ms_account"));
}
