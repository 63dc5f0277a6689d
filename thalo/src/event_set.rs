//! `event_set!`: one event enum over several aggregate types, for multi-stream
//! projections.

/// Declares an enum that gathers the events of several aggregate types, for a projection
/// or handler that reads them all (a "multi-stream projection": balances per owner
/// across accounts and cards, say).
///
/// Each variant names an aggregate and holds that aggregate's event enum
/// (`<A as Aggregate>::Event`). The macro implements [`Event`](crate::Event) (the type
/// name, version and payload are the inner event's; decoding picks the variant by the
/// envelope's aggregate type with [`Event::decode_from`](crate::Event::decode_from), so
/// event type names may repeat across aggregates), [`EventSet`](crate::EventSet) and
/// `From<inner event>` for each variant. The enum derives `Clone` and `Debug`; add
/// `#[derive(PartialEq)]` and other attributes above it as usual (the enums `#[events]`
/// generates derive `PartialEq`, so a set of them can too).
///
/// Feed it with [`Subscription::new_set`](crate::Subscription::new_set) in process,
/// `thalo_postgres::PgSubscription::new_set` for exactly-once Postgres read models, or
/// `thalo_kafka::KafkaConsumer::subscribe_set` from Kafka. The store-fed subscriptions
/// deliver the events of all the set's aggregates in global order; Kafka, one topic per
/// aggregate type, delivers each aggregate's events in order.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::collections::BTreeMap;
/// use std::sync::Mutex;
///
/// use thalo::{commands, events, Aggregate, Error, EventEnvelope, EventHandler, EventSet};
/// use thalo::{InMemoryEventStore, Projection, Repository, Subscription};
///
/// #[derive(Aggregate, Clone, Debug, Default)]
/// pub struct Account {
///     #[identity]
///     id: String,
/// }
///
/// #[commands]
/// impl Account {
///     pub fn open(&self, owner: String, cents: i64) -> Result<OpenedEvent, Error> {
///         Ok(OpenedEvent { owner, cents })
///     }
/// }
///
/// #[events]
/// impl Account {
///     pub fn opened(&mut self, owner: String, cents: i64) {
///         let _ = (owner, cents);
///     }
/// }
///
/// #[derive(Aggregate, Clone, Debug, Default)]
/// pub struct Card {
///     #[identity]
///     id: String,
/// }
///
/// #[commands]
/// impl Card {
///     pub fn issue(&self, owner: String, limit_cents: i64) -> Result<IssuedEvent, Error> {
///         Ok(IssuedEvent { owner, limit_cents })
///     }
/// }
///
/// #[events]
/// impl Card {
///     // Stored under the same type name as the account's event.
///     #[event(name = "Opened")]
///     pub fn issued(&mut self, owner: String, limit_cents: i64) {
///         let _ = (owner, limit_cents);
///     }
/// }
///
/// thalo::event_set! {
///     /// Everything the per-owner view reads.
///     #[derive(PartialEq)]
///     pub enum OwnerEvent {
///         Account(Account),
///         Card(Card),
///     }
/// }
///
/// /// Money per owner: balances plus card limits.
/// #[derive(Default)]
/// struct PerOwner(Mutex<BTreeMap<String, i64>>);
///
/// impl EventHandler<OwnerEvent> for PerOwner {
///     async fn handle(&self, envelope: &EventEnvelope<OwnerEvent>) -> Result<(), Error> {
///         let (owner, cents) = match &envelope.event {
///             OwnerEvent::Account(AccountEvent::Opened(e)) => (&e.owner, e.cents),
///             OwnerEvent::Card(CardEvent::Issued(e)) => (&e.owner, e.limit_cents),
///         };
///         *self.0.lock().unwrap().entry(owner.clone()).or_default() += cents;
///         Ok(())
///     }
/// }
///
/// impl Projection<OwnerEvent> for PerOwner {
///     fn name(&self) -> &str {
///         "per_owner"
///     }
/// }
///
/// assert_eq!(OwnerEvent::aggregate_types(), ["account", "card"]);
///
/// let store = InMemoryEventStore::new();
/// let repo = Repository::new(store.clone());
/// let (ada, cents) = ("ada".to_string(), 10_00);
/// repo.execute::<Account>(&"a-1".into(), AccountCommand::Open { owner: ada.clone(), cents }).await?;
/// repo.execute::<Card>(&"c-1".into(), CardCommand::Issue { owner: ada, limit_cents: 5_00 }).await?;
///
/// // The set's type comes from the projection's `Projection<OwnerEvent>` impl.
/// let mut subscription = Subscription::new_set(store, PerOwner::default());
/// assert_eq!(subscription.catch_up().await?, 2);
/// assert_eq!(subscription.projection().0.lock().unwrap()["ada"], 15_00);
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
///
/// A variant must hold an aggregate (a type that implements [`Aggregate`](crate::Aggregate)),
/// written as a type, one variant per aggregate: anything else is a compile error, and
/// so are two aggregates with the same [type name](crate::AggregateType::TYPE). Generic
/// enums are not supported.
#[macro_export]
macro_rules! event_set {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $(
                $(#[$variant_meta:meta])*
                $variant:ident($aggregate:ty)
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(::core::clone::Clone, ::core::fmt::Debug)]
        $vis enum $name {
            $(
                $(#[$variant_meta])*
                #[doc = ""]
                #[doc = ::core::concat!(" The events of the aggregate `", ::core::stringify!($aggregate), "`.")]
                $variant(<$aggregate as $crate::Aggregate>::Event),
            )+
        }

        // Two aggregates under one type name could not be told apart when decoding.
        const _: () = $crate::__private::assert_distinct_aggregate_types(&[
            $(<$aggregate as $crate::AggregateType>::TYPE),+
        ]);

        #[automatically_derived]
        impl $crate::Event for $name {
            fn event_type(&self) -> &'static str {
                match self {
                    $(Self::$variant(event) => $crate::Event::event_type(event),)+
                }
            }

            fn event_version(&self) -> u16 {
                match self {
                    $(Self::$variant(event) => $crate::Event::event_version(event),)+
                }
            }

            fn encode(&self) -> ::core::result::Result<::std::string::String, $crate::Error> {
                match self {
                    $(Self::$variant(event) => $crate::Event::encode(event),)+
                }
            }

            fn decode(
                event_type: &str,
                version: u16,
                payload: &str,
            ) -> ::core::result::Result<Self, $crate::Error> {
                // Without the aggregate type: the one aggregate that knows the name.
                let aggregate_type = $crate::__private::only_aggregate_with(
                    event_type,
                    version,
                    ::core::stringify!($name),
                    &[$((
                        <$aggregate as $crate::AggregateType>::TYPE,
                        <<$aggregate as $crate::Aggregate>::Event as $crate::Event>::event_types(),
                    )),+],
                )?;
                <Self as $crate::Event>::decode_from(aggregate_type, event_type, version, payload)
            }

            fn decode_from(
                aggregate_type: &str,
                event_type: &str,
                version: u16,
                payload: &str,
            ) -> ::core::result::Result<Self, $crate::Error> {
                $(
                    if aggregate_type == <$aggregate as $crate::AggregateType>::TYPE {
                        return ::core::result::Result::map(
                            <<$aggregate as $crate::Aggregate>::Event as $crate::Event>::decode_from(
                                aggregate_type,
                                event_type,
                                version,
                                payload,
                            ),
                            Self::$variant,
                        );
                    }
                )+
                ::core::result::Result::Err($crate::__private::unknown_aggregate_type(
                    aggregate_type,
                    event_type,
                    ::core::stringify!($name),
                ))
            }

            fn event_types() -> &'static [&'static str] {
                static TYPES: ::std::sync::OnceLock<::std::vec::Vec<&'static str>> =
                    ::std::sync::OnceLock::new();
                TYPES.get_or_init(|| {
                    $crate::__private::union_event_types(&[
                        $(<<$aggregate as $crate::Aggregate>::Event as $crate::Event>::event_types()),+
                    ])
                })
            }
        }

        #[automatically_derived]
        impl $crate::EventSet for $name {
            fn aggregate_types() -> &'static [&'static str] {
                const TYPES: &[&str] = &[$(<$aggregate as $crate::AggregateType>::TYPE),+];
                TYPES
            }
        }

        $(
            #[automatically_derived]
            impl ::core::convert::From<<$aggregate as $crate::Aggregate>::Event> for $name {
                fn from(event: <$aggregate as $crate::Aggregate>::Event) -> Self {
                    Self::$variant(event)
                }
            }
        )+
    };
    ($($input:tt)*) => {
        ::core::compile_error!(
            "expected `event_set! { pub enum Name { Variant(Aggregate), ... } }`: an enum with one tuple variant per aggregate type, holding the aggregate's type"
        );
    };
}

#[cfg(test)]
mod tests {
    use crate::{Aggregate, AggregateType, Error, Event, EventSet};

    /// A hand-written aggregate whose event names collide with [`Second`]'s.
    macro_rules! aggregate {
        ($aggregate:ident, $event:ident, $name:literal) => {
            #[derive(Clone, Debug, PartialEq)]
            pub enum $event {
                Opened(u64),
                Only,
            }

            impl Event for $event {
                fn event_type(&self) -> &'static str {
                    match self {
                        $event::Opened(_) => "Opened",
                        $event::Only => concat!($name, "Only"),
                    }
                }
                fn encode(&self) -> Result<String, Error> {
                    Ok(match self {
                        $event::Opened(n) => n.to_string(),
                        $event::Only => "null".to_owned(),
                    })
                }
                fn decode(event_type: &str, version: u16, payload: &str) -> Result<Self, Error> {
                    match event_type {
                        "Opened" => payload
                            .parse()
                            .map($event::Opened)
                            .map_err(|e| Error::serialization(event_type, e)),
                        concat!($name, "Only") => Ok($event::Only),
                        other => Err(Error::UnknownEventType {
                            event_type: other.to_owned(),
                            version,
                            target: stringify!($event),
                        }),
                    }
                }
                fn event_types() -> &'static [&'static str] {
                    &["Opened", concat!($name, "Only")]
                }
            }

            #[derive(Debug)]
            pub struct $aggregate(u64);

            impl AggregateType for $aggregate {
                const TYPE: &'static str = $name;
            }

            impl Aggregate for $aggregate {
                type Id = u64;
                type Command = ();
                type Event = $event;
                type Error = Error;
                fn new(id: u64) -> Self {
                    $aggregate(id)
                }
                fn id(&self) -> &u64 {
                    &self.0
                }
                fn handle(&self, (): ()) -> Result<Vec<$event>, Error> {
                    Ok(Vec::new())
                }
                fn apply(&mut self, _: $event) {}
            }
        };
    }

    aggregate!(First, FirstEvent, "first");
    aggregate!(Second, SecondEvent, "second");

    crate::event_set! {
        /// Both.
        #[derive(PartialEq)]
        pub enum Both {
            One(First),
            Two(Second),
        }
    }

    #[test]
    fn decodes_by_aggregate_type() {
        assert_eq!(Both::aggregate_types(), ["first", "second"]);
        assert_eq!(
            Both::decode_from("first", "Opened", 1, "7").unwrap(),
            Both::One(FirstEvent::Opened(7))
        );
        assert_eq!(
            Both::decode_from("second", "Opened", 1, "8").unwrap(),
            Both::Two(SecondEvent::Opened(8))
        );
        let err = Both::decode_from("third", "Opened", 1, "9").unwrap_err();
        assert!(
            matches!(&err, Error::UnknownAggregateType { aggregate_type, target: "Both", .. } if aggregate_type == "third"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "aggregate type `third` (event `Opened`) is not in Both"
        );
    }

    #[test]
    fn delegates_names_versions_and_payloads() {
        let event = Both::from(SecondEvent::Opened(3));
        assert_eq!(event, Both::Two(SecondEvent::Opened(3)));
        assert_eq!(event.event_type(), "Opened");
        assert_eq!(event.event_version(), 1);
        assert_eq!(event.encode().unwrap(), "3");
        assert_eq!(
            Both::event_types(),
            ["Opened", "firstOnly", "secondOnly"],
            "the union, each name once"
        );
    }

    #[test]
    fn decode_without_the_aggregate_type_needs_an_unambiguous_name() {
        assert_eq!(
            Both::decode("secondOnly", 1, "null").unwrap(),
            Both::Two(SecondEvent::Only)
        );
        let err = Both::decode("Opened", 1, "1").unwrap_err();
        assert!(
            matches!(&err, Error::UnknownAggregateType { aggregate_type, .. } if aggregate_type.is_empty()),
            "{err:?}"
        );
        let err = Both::decode("Closed", 2, "1").unwrap_err();
        assert!(
            matches!(&err, Error::UnknownEventType { event_type, version: 2, target: "Both" } if event_type == "Closed"),
            "{err:?}"
        );
    }
}
