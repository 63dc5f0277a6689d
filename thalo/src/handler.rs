//! Event handlers and projections: the read side.

use std::future::Future;

use crate::{Error, Event, EventEnvelope};

/// Reacts to stored events: sends an email, calls another service, updates a read model.
///
/// Handlers run in [`Subscription`](crate::Subscription)s (in process) or in
/// `thalo_kafka` consumers. Both deliver each aggregate's events in sequence order and
/// at least once: a handler may see an event again after a crash, so its effects should
/// be idempotent (or use a Postgres projection, which stores its checkpoint in the same
/// transaction as its changes).
///
/// Returning an error stops a [`Subscription`](crate::Subscription) at that event (it
/// is retried on restart), except an [`Error::Store`] of the store's own reads, which
/// is retried with backoff. Kafka consumers retry outages (an unreachable database or
/// broker) until they end, retry other errors a few times, and then park the
/// aggregate's stream and dead-letter the event. The whole rule is in `thalo_kafka`'s
/// crate docs, section "Errors in handlers: retry or dead-letter".
pub trait EventHandler<E: Event>: Send + Sync {
    /// Handles one event.
    ///
    /// # Errors
    ///
    /// Any error means the event was not handled.
    fn handle(&self, envelope: &EventEnvelope<E>)
        -> impl Future<Output = Result<(), Error>> + Send;
}

/// An event handler that builds a read model and has a stable name, under which its
/// checkpoint (how far it has read) is stored.
pub trait Projection<E: Event>: EventHandler<E> {
    /// Stable name of the projection: its checkpoint is stored under it (and a Kafka-fed
    /// Postgres projection's consumer group derives from it).
    ///
    /// Changing it starts the projection over: under the new name there is no
    /// checkpoint yet (and no consumer group), so it is handed every event again from
    /// the start. Nothing else changes: the read model it built is not cleared, so a
    /// renamed projection that writes the same tables applies every event on top of
    /// what is there. To rebuild a read model, write it somewhere new; with
    /// `thalo_postgres`, give the projection a new `version()` whose
    /// `ReadModelTable`s are tables of its own, built beside the live ones and
    /// swapped in when caught up.
    fn name(&self) -> &str;
}

impl<E: Event, H: EventHandler<E>> EventHandler<E> for std::sync::Arc<H> {
    fn handle(
        &self,
        envelope: &EventEnvelope<E>,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        (**self).handle(envelope)
    }
}

impl<E: Event, P: Projection<E>> Projection<E> for std::sync::Arc<P> {
    fn name(&self) -> &str {
        (**self).name()
    }
}
