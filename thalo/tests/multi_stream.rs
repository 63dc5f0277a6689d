//! Multi-stream projections in process: one `Subscription` over an event set of two
//! aggregate types whose event type names collide.

use std::sync::{Mutex, PoisonError};

use thalo::{
    commands, events, Aggregate, AggregateType, Error, Event, EventEnvelope, EventHandler,
    EventSet, EventStore, InMemoryEventStore, Metadata, Projection, Repository, Subscription,
};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
}

#[commands]
impl Account {
    pub fn open(&self, owner: String) -> Result<OpenedEvent, Error> {
        Ok(OpenedEvent { owner })
    }

    pub fn deposit(&self, cents: i64) -> Result<DepositedEvent, Error> {
        Ok(DepositedEvent { cents })
    }
}

#[events]
impl Account {
    pub fn opened(&mut self, owner: String) {
        let _ = owner;
    }

    pub fn deposited(&mut self, cents: i64) {
        let _ = cents;
    }
}

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Card {
    #[identity]
    id: String,
}

#[commands]
impl Card {
    pub fn issue(&self, holder: String) -> Result<IssuedEvent, Error> {
        Ok(IssuedEvent { holder })
    }

    pub fn charge(&self, cents: i64) -> Result<ChargedEvent, Error> {
        Ok(ChargedEvent { cents })
    }
}

#[events]
impl Card {
    /// Same stored type name as `Account`'s `Opened`, different payload.
    #[event(name = "Opened")]
    pub fn issued(&mut self, holder: String) {
        let _ = holder;
    }

    /// Same stored type name as `Account`'s `Deposited`, with a field of the same name.
    #[event(name = "Deposited")]
    pub fn charged(&mut self, cents: i64) {
        let _ = cents;
    }
}

thalo::event_set! {
    /// Accounts and cards.
    #[derive(PartialEq)]
    pub enum MoneyEvent {
        Account(Account),
        Card(Card),
    }
}

/// Not in the set: its events must never reach the projection.
#[derive(Aggregate, Clone, Debug, Default)]
pub struct Noise {
    #[identity]
    id: String,
}

#[commands]
impl Noise {
    pub fn make(&self) -> Result<MadeEvent, Error> {
        Ok(MadeEvent {})
    }
}

#[events]
impl Noise {
    #[event(name = "Opened")]
    pub fn made(&mut self) {}
}

/// Records every envelope it is handed: (position, aggregate id, event).
#[derive(Debug, Default)]
struct Log(Mutex<Vec<(u64, String, MoneyEvent)>>);

impl Log {
    fn entries(&self) -> Vec<(u64, String, MoneyEvent)> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl EventHandler<MoneyEvent> for Log {
    async fn handle(&self, envelope: &EventEnvelope<MoneyEvent>) -> Result<(), Error> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push((
            envelope.position,
            envelope.aggregate_id.clone(),
            envelope.event.clone(),
        ));
        Ok(())
    }
}

impl Projection<MoneyEvent> for Log {
    fn name(&self) -> &str {
        "money_log"
    }
}

#[tokio::test]
async fn a_subscription_over_a_set_applies_every_event_once_in_global_order() {
    assert_eq!(MoneyEvent::aggregate_types(), ["account", "card"]);
    assert_eq!(
        MoneyEvent::event_types(),
        ["Opened", "Deposited"],
        "the union of the names"
    );

    let store = InMemoryEventStore::new();
    let repo = Repository::new(store.clone());
    let (a, c, n) = ("a-1".to_owned(), "c-1".to_owned(), "n-1".to_owned());
    repo.execute::<Account>(
        &a,
        AccountCommand::Open {
            owner: "ada".into(),
        },
    )
    .await
    .unwrap();
    repo.execute::<Card>(
        &c,
        CardCommand::Issue {
            holder: "ada".into(),
        },
    )
    .await
    .unwrap();
    repo.execute::<Noise>(&n, NoiseCommand::Make).await.unwrap();
    repo.execute::<Card>(&c, CardCommand::Charge { cents: 7 })
        .await
        .unwrap();
    repo.execute::<Account>(&a, AccountCommand::Deposit { cents: 5 })
        .await
        .unwrap();

    // Small batches: the order must hold across batch boundaries.
    let mut subscription = Subscription::new_set(store.clone(), Log::default()).with_batch_size(2);
    assert_eq!(subscription.catch_up().await.unwrap(), 4);
    let expected = vec![
        (
            1,
            a.clone(),
            MoneyEvent::Account(AccountEvent::Opened(OpenedEvent {
                owner: "ada".into(),
            })),
        ),
        (
            2,
            c.clone(),
            MoneyEvent::Card(CardEvent::Issued(IssuedEvent {
                holder: "ada".into(),
            })),
        ),
        (
            4,
            c.clone(),
            MoneyEvent::Card(CardEvent::Charged(ChargedEvent { cents: 7 })),
        ),
        (
            5,
            a.clone(),
            MoneyEvent::Account(AccountEvent::Deposited(DepositedEvent { cents: 5 })),
        ),
    ];
    assert_eq!(subscription.projection().entries(), expected);

    // Nothing twice: a second catch-up and a fresh subscription on the saved checkpoint
    // hand over only what is new.
    assert_eq!(subscription.catch_up().await.unwrap(), 0);
    repo.execute::<Card>(&c, CardCommand::Charge { cents: 1 })
        .await
        .unwrap();
    let mut resumed = Subscription::<_, _, MoneyEvent>::new_set(store.clone(), Log::default());
    assert_eq!(resumed.catch_up().await.unwrap(), 1);
    assert_eq!(
        resumed.projection().entries(),
        [(
            6,
            c.clone(),
            MoneyEvent::Card(CardEvent::Charged(ChargedEvent { cents: 1 }))
        )]
    );
    assert_eq!(subscription.projection().entries(), expected);
}

#[tokio::test]
async fn a_set_decodes_each_stored_event_by_its_aggregate_type() {
    let store = InMemoryEventStore::new();
    store
        .append::<Card>(
            &"c-1".to_owned(),
            0,
            vec![CardEvent::Issued(IssuedEvent {
                holder: "bo".into(),
            })],
            &Metadata::default(),
        )
        .await
        .unwrap();
    let raw = store.read_all(0, 10).await.unwrap();
    assert_eq!(raw[0].aggregate_type, Card::TYPE);
    assert_eq!(raw[0].event.event_type, "Opened");
    let decoded = raw[0].decode::<MoneyEvent>().unwrap();
    assert_eq!(
        decoded.event,
        MoneyEvent::Card(CardEvent::Issued(IssuedEvent {
            holder: "bo".into()
        }))
    );
    // Without the aggregate type, `Opened` is ambiguous in this set.
    let err = raw[0].event.decode::<MoneyEvent>().unwrap_err();
    assert!(matches!(err, Error::UnknownAggregateType { .. }), "{err:?}");
    // An event of an aggregate outside the set is refused, not guessed.
    let mut foreign = raw[0].clone();
    foreign.aggregate_type = Noise::TYPE.to_owned();
    let err = foreign.decode::<MoneyEvent>().unwrap_err();
    assert!(
        matches!(&err, Error::UnknownAggregateType { aggregate_type, .. } if aggregate_type == "noise"),
        "{err:?}"
    );
}
