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
/// Returning an error stops the subscription at that event (it is retried on restart);
/// Kafka consumers retry with backoff and then dead-letter it.
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
    /// Stable name of the projection; changing it rebuilds the projection from scratch.
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
