//! `thalo parked`: aggregates the relay parked, streams consumers parked.
//!
//! The relay parks an *aggregate* for everyone when the broker refuses one of its events
//! for good (`outbox_parked`); retrying publishes its events again from the refused one,
//! skipping drops the refused event from the outbox. A consumer parks a *stream* for
//! itself when it gives up on an event or finds a gap (`consumer_parked`); only the
//! consumer's own code can re-drive it (the events go through its projection or
//! handler), so this tool can skip the first parked event, and no more. Every decision
//! is recorded in `parking_log` by the library calls used here.

use serde::Serialize;
use thalo_postgres::{ParkedAggregate, ParkedStream};

use crate::args::{ParkedCommand, RetryArgs, SkipArgs};
use crate::error::{CliError, Result};
use crate::output::{self, clip, section, table, Report};
use crate::store::Store;

/// An aggregate the relay parked.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ParkedAggregateView {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: u64,
    pub position: u64,
    pub outbox_id: i64,
    /// Its events waiting in the outbox, the refused one included.
    pub waiting: u64,
    pub parked_at: String,
    pub error: String,
}

impl From<&ParkedAggregate> for ParkedAggregateView {
    fn from(p: &ParkedAggregate) -> Self {
        ParkedAggregateView {
            aggregate_type: p.aggregate_type.clone(),
            aggregate_id: p.aggregate_id.clone(),
            sequence: p.sequence,
            position: p.position,
            outbox_id: p.outbox_id,
            waiting: p.waiting,
            parked_at: output::time(&p.parked_at),
            error: p.error.clone(),
        }
    }
}

/// A stream a consumer parked.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ParkedStreamView {
    pub consumer: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// The first event the consumer did not apply.
    pub sequence: u64,
    /// Later events held behind it.
    pub held: u64,
    pub parked_at: String,
    pub updated_at: String,
    pub error: String,
}

impl From<&ParkedStream> for ParkedStreamView {
    fn from(p: &ParkedStream) -> Self {
        ParkedStreamView {
            consumer: p.consumer.clone(),
            aggregate_type: p.aggregate_type.clone(),
            aggregate_id: p.aggregate_id.clone(),
            sequence: p.sequence,
            held: p.held,
            parked_at: output::time(&p.parked_at),
            updated_at: output::time(&p.updated_at),
            error: p.error.clone(),
        }
    }
}

/// Both kinds, as `parked list` and `status` show them.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ParkedReport {
    /// Aggregates the relay parked.
    pub relay: Vec<ParkedAggregateView>,
    /// Streams consumers parked.
    pub consumers: Vec<ParkedStreamView>,
}

impl ParkedReport {
    pub(crate) async fn load(store: &Store) -> Result<Self> {
        let relay = store.store.outbox().parked().await?;
        let consumers = store.store.parked_streams(None).await?;
        Ok(ParkedReport {
            relay: relay.iter().map(ParkedAggregateView::from).collect(),
            consumers: consumers.iter().map(ParkedStreamView::from).collect(),
        })
    }

    /// The two tables, under their headings.
    pub(crate) fn write(&self, out: &mut String) {
        let mut relay = table([
            "TYPE",
            "ID",
            "SEQUENCE",
            "POSITION",
            "WAITING",
            "PARKED AT",
            "ERROR",
        ]);
        for p in &self.relay {
            relay.add_row([
                p.aggregate_type.clone(),
                p.aggregate_id.clone(),
                p.sequence.to_string(),
                p.position.to_string(),
                p.waiting.to_string(),
                p.parked_at.clone(),
                clip(&p.error, 80),
            ]);
        }
        section(out, "Parked aggregates (relay)", &relay);
        let mut consumers = table([
            "CONSUMER",
            "TYPE",
            "ID",
            "SEQUENCE",
            "HELD",
            "PARKED AT",
            "ERROR",
        ]);
        for p in &self.consumers {
            consumers.add_row([
                p.consumer.clone(),
                p.aggregate_type.clone(),
                p.aggregate_id.clone(),
                p.sequence.to_string(),
                p.held.to_string(),
                p.parked_at.clone(),
                clip(&p.error, 80),
            ]);
        }
        section(out, "Parked streams (consumers)", &consumers);
    }
}

impl Report for ParkedReport {
    fn text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }
}

/// What `retry` or `skip` did.
#[derive(Debug, Serialize)]
struct Decision {
    action: &'static str,
    /// `null` for the relay, else the consumer.
    consumer: Option<String>,
    aggregate_type: String,
    aggregate_id: String,
    /// The skipped event's sequence (skip only).
    sequence: Option<u64>,
    /// The skipped event's global position (relay skip only).
    position: Option<u64>,
    #[serde(skip)]
    message: String,
}

impl Report for Decision {
    fn text(&self) -> String {
        format!("{}\n", self.message)
    }
}

pub(crate) async fn run(store: &Store, command: ParkedCommand, json: bool) -> Result<()> {
    match command {
        ParkedCommand::List => output::emit(&ParkedReport::load(store).await?, json),
        ParkedCommand::Retry(args) => output::emit(&retry(store, args).await?, json),
        ParkedCommand::Skip(args) => output::emit(&skip(store, args).await?, json),
    }
}

async fn retry(store: &Store, args: RetryArgs) -> Result<Decision> {
    if let Some(consumer) = args.consumer {
        return Err(CliError::usage(format!(
            "a stream `{consumer}` parked is re-driven by `{consumer}`'s own code \
             (PgEventStore::redrive_projection or redrive_handler), which this tool does not \
             have; `thalo parked skip {} {} --consumer {consumer} --reason ...` skips its first \
             parked event",
            args.aggregate_type, args.aggregate_id
        )));
    }
    let released = store
        .store
        .outbox()
        .retry(&args.aggregate_type, &args.aggregate_id)
        .await?;
    if !released {
        return Err(CliError::NotParked {
            what: format!("{} `{}` (relay)", args.aggregate_type, args.aggregate_id),
        });
    }
    Ok(Decision {
        action: "retried",
        consumer: None,
        message: format!(
            "released {} `{}`: the relay publishes its events again, from the refused one on",
            args.aggregate_type, args.aggregate_id
        ),
        aggregate_type: args.aggregate_type,
        aggregate_id: args.aggregate_id,
        sequence: None,
        position: None,
    })
}

async fn skip(store: &Store, args: SkipArgs) -> Result<Decision> {
    if args.reason.trim().is_empty() {
        return Err(CliError::usage(
            "--reason must say why the event is skipped (it is recorded in parking_log)",
        ));
    }
    match args.consumer {
        None => {
            let skipped = store
                .store
                .outbox()
                .skip(&args.aggregate_type, &args.aggregate_id, &args.reason)
                .await?;
            let Some(skipped) = skipped else {
                return Err(CliError::NotParked {
                    what: format!("{} `{}` (relay)", args.aggregate_type, args.aggregate_id),
                });
            };
            Ok(Decision {
                action: "skipped",
                consumer: None,
                message: format!(
                    "skipped event {} (position {}) of {} `{}`: it stays in the store and is never \
                     published; the aggregate's later events are published next, and consumers \
                     will park the stream on the gap until their operators decide",
                    skipped.sequence, skipped.position, args.aggregate_type, args.aggregate_id
                ),
                aggregate_type: args.aggregate_type,
                aggregate_id: args.aggregate_id,
                sequence: Some(skipped.sequence),
                position: Some(skipped.position),
            })
        }
        Some(consumer) => {
            let skipped = store
                .store
                .skip_parked(
                    &consumer,
                    &args.aggregate_type,
                    &args.aggregate_id,
                    &args.reason,
                )
                .await?;
            let Some(sequence) = skipped else {
                return Err(CliError::NotParked {
                    what: format!(
                        "{} `{}` (consumer `{consumer}`)",
                        args.aggregate_type, args.aggregate_id
                    ),
                });
            };
            Ok(Decision {
                action: "skipped",
                message: format!(
                    "skipped event {sequence} of {} `{}` for `{consumer}`: the stream stays parked \
                     at event {}; re-drive it from `{consumer}`'s code \
                     (PgEventStore::redrive_projection / redrive_handler) to apply the rest",
                    args.aggregate_type,
                    args.aggregate_id,
                    sequence + 1
                ),
                consumer: Some(consumer),
                aggregate_type: args.aggregate_type,
                aggregate_id: args.aggregate_id,
                sequence: Some(sequence),
                position: None,
            })
        }
    }
}
