//! `AnyEvent`: the events of every aggregate type, undecoded, for projections and
//! handlers that read them all (an audit log, a search index, a copy to another system).

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use serde::de::DeserializeOwned;

use crate::{Error, Event, EventSet};

/// An event of any aggregate type, as stored: its type name, schema version and JSON
/// payload. Subscribe with it to read **every** aggregate type, in the store's global
/// order: `Subscription::new_set`, `thalo_postgres::PgSubscription::new_set`, or a
/// `thalo_kafka::KafkaConsumer` with the topics named (`with_topic`; a Kafka consumer
/// cannot know every topic, so `subscribe_set::<AnyEvent>()` subscribes to none).
///
/// The envelope's `aggregate_type` says which aggregate an event belongs to; decode the
/// payload with [`AnyEvent::decode_as`] (one aggregate's event enum) or
/// [`AnyEvent::payload_as`] (any `Deserialize` type), or read it as JSON with
/// [`AnyEvent::payload`].
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::sync::Mutex;
///
/// use thalo::{commands, events, Aggregate, AnyEvent, Error, EventEnvelope, EventHandler};
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
///     pub fn open(&self, owner: String) -> Result<OpenedEvent, Error> {
///         Ok(OpenedEvent { owner })
///     }
/// }
///
/// #[events]
/// impl Account {
///     pub fn opened(&mut self, owner: String) {
///         let _ = owner;
///     }
/// }
///
/// /// One line per event of any aggregate type.
/// #[derive(Default)]
/// struct AuditLog(Mutex<Vec<String>>);
///
/// impl EventHandler<AnyEvent> for AuditLog {
///     async fn handle(&self, envelope: &EventEnvelope<AnyEvent>) -> Result<(), Error> {
///         let line = format!(
///             "{}/{} {} v{} {}",
///             envelope.aggregate_type,
///             envelope.aggregate_id,
///             envelope.event.event_type_name(),
///             envelope.event.version(),
///             envelope.event.payload(),
///         );
///         self.0.lock().unwrap().push(line);
///         Ok(())
///     }
/// }
///
/// impl Projection<AnyEvent> for AuditLog {
///     fn name(&self) -> &str {
///         "audit_log"
///     }
/// }
///
/// let store = InMemoryEventStore::new();
/// Repository::new(store.clone())
///     .execute::<Account>(&"a-1".into(), AccountCommand::Open { owner: "ada".into() })
///     .await?;
/// let mut subscription = Subscription::new_set(store, AuditLog::default());
/// subscription.catch_up().await?;
/// let log = subscription.projection().0.lock().unwrap().clone();
/// assert_eq!(log, [r#"account/a-1 Opened v1 {"owner":"ada"}"#]);
///
/// // The payload, decoded as the aggregate's own event:
/// let any = AnyEvent::new("Opened", 1, serde_json::json!({ "owner": "ada" }));
/// assert!(matches!(any.decode_as::<AccountEvent>()?, AccountEvent::Opened(_)));
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct AnyEvent {
    event_type: &'static str,
    version: u16,
    payload: serde_json::Value,
}

impl AnyEvent {
    /// An event of type `event_type` at schema `version` with `payload`.
    pub fn new(event_type: &str, version: u16, payload: serde_json::Value) -> Self {
        AnyEvent {
            event_type: intern(event_type),
            version,
            payload,
        }
    }

    /// The stored type name of the event (`Opened`).
    pub fn event_type_name(&self) -> &'static str {
        self.event_type
    }

    /// The schema version it was stored with.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The payload, as JSON.
    pub fn payload(&self) -> &serde_json::Value {
        &self.payload
    }

    /// The payload deserialized into `T` (e.g. one variant's struct).
    ///
    /// # Errors
    ///
    /// [`Error::Serialization`] when the payload does not fit `T`.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, Error> {
        T::deserialize(&self.payload).map_err(|e| Error::serialization(self.event_type, e))
    }

    /// The event decoded as `E` (usually an aggregate's event enum), by its type name
    /// and version, as a subscription of `E` would decode it.
    ///
    /// # Errors
    ///
    /// As [`Event::decode`]: [`Error::UnknownEventType`] for a type name `E` does not
    /// know, [`Error::Serialization`] for a payload that does not fit.
    pub fn decode_as<E: Event>(&self) -> Result<E, Error> {
        E::decode(self.event_type, self.version, &self.payload.to_string())
    }
}

/// Event type names are a small, fixed vocabulary, but [`Event::event_type`] returns a
/// `&'static str`: each distinct name read is kept once for the life of the process.
fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = names.get(name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

impl Event for AnyEvent {
    fn event_type(&self) -> &'static str {
        self.event_type
    }

    fn event_version(&self) -> u16 {
        self.version
    }

    fn encode(&self) -> Result<String, Error> {
        serde_json::to_string(&self.payload).map_err(|e| Error::serialization(self.event_type, e))
    }

    fn decode(event_type: &str, version: u16, payload: &str) -> Result<Self, Error> {
        let payload =
            serde_json::from_str(payload).map_err(|e| Error::serialization(event_type, e))?;
        Ok(AnyEvent::new(event_type, version, payload))
    }

    /// Every type name: none is listed, all are accepted.
    fn event_types() -> &'static [&'static str] {
        &[]
    }
}

impl EventSet for AnyEvent {
    /// None listed: [`AnyEvent`] holds the events of every aggregate type
    /// ([`EventSet::includes`] is always true).
    fn aggregate_types() -> &'static [&'static str] {
        &[]
    }

    fn includes(_aggregate_type: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_interned_once() {
        let a = AnyEvent::new(&String::from("Opened"), 1, serde_json::Value::Null);
        let b = AnyEvent::new(&String::from("Opened"), 2, serde_json::Value::Null);
        assert!(std::ptr::eq(a.event_type(), b.event_type()));
    }

    #[test]
    fn round_trips_and_rejects_what_is_not_json() {
        let event = AnyEvent::decode("Deposited", 2, r#"{"cents":5}"#).expect("decode");
        assert_eq!(event.event_type(), "Deposited");
        assert_eq!(event.event_version(), 2);
        assert_eq!(event.encode().expect("encode"), r#"{"cents":5}"#);
        assert_eq!(event.payload()["cents"], 5);
        #[derive(serde::Deserialize)]
        struct Deposited {
            cents: i64,
        }
        assert_eq!(event.payload_as::<Deposited>().expect("payload").cents, 5);
        assert!(matches!(
            AnyEvent::decode("Deposited", 1, "not json"),
            Err(Error::Serialization { .. })
        ));
        assert!(AnyEvent::includes("anything"));
    }
}
