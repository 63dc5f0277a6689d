//! `thalo status`: the whole pipeline at a glance.
//!
//! Postgres first (outbox, relay leader, parked aggregates and streams, projections),
//! then Kafka (consumer-group lag per partition). Kafka is optional: when no broker is
//! configured it is left out, and when it is configured but unreachable the report says
//! so and the exit status stays 0, unless `--strict`, so that a broker outage never
//! hides what Postgres knows.

use std::time::Duration;

use serde::Serialize;

use crate::args::{Global, StatusArgs};
use crate::error::{CliError, Result};
use crate::kafka::{GroupLag, Kafka};
use crate::output::{self, section, table, Report};
use crate::parked::ParkedReport;
use crate::projection::{self, Kind, ProjectionView};
use crate::store::Store;

#[derive(Debug, Serialize)]
struct StatusReport {
    schema: String,
    /// The highest global position in the store.
    head_position: u64,
    outbox: OutboxView,
    relay: RelayView,
    parked: ParkedReport,
    projections: Vec<ProjectionView>,
    kafka: KafkaView,
}

#[derive(Debug, Serialize)]
struct OutboxView {
    /// Rows waiting to be published, parked ones included.
    pending: u64,
    /// Age of the oldest waiting event, in seconds.
    oldest_age_seconds: Option<f64>,
    /// Aggregates the relay parked.
    parked_aggregates: u64,
    #[serde(skip)]
    oldest_age: Option<Duration>,
}

#[derive(Debug, Serialize)]
struct RelayView {
    /// The last relay to take the outbox (the row outlives it).
    leader: Option<LeaderView>,
    /// Whether a session holds the outbox lock now: a relay is leading.
    lock_held: bool,
}

#[derive(Debug, Serialize)]
struct LeaderView {
    holder: String,
    epoch: u64,
    since: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum KafkaState {
    /// Reported.
    Ok,
    /// No broker configured.
    NotConfigured,
    /// `--no-kafka`.
    Skipped,
    /// Configured but not reachable.
    Unreachable,
}

#[derive(Debug, Serialize)]
struct KafkaView {
    state: KafkaState,
    brokers: Option<String>,
    error: Option<String>,
    groups: Vec<GroupLag>,
}

impl Report for StatusReport {
    fn text(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "Event store (schema `{}`): head position {}\n\n",
            self.schema, self.head_position
        ));
        out.push_str(&format!(
            "Outbox: {} pending, oldest {}, {}\n",
            self.outbox.pending,
            output::age(self.outbox.oldest_age),
            output::count(
                self.outbox.parked_aggregates,
                "parked aggregate",
                "parked aggregates"
            )
        ));
        match &self.relay.leader {
            Some(leader) => out.push_str(&format!(
                "Relay: leader `{}`, epoch {}, since {} ({})\n\n",
                leader.holder,
                leader.epoch,
                leader.since,
                if self.relay.lock_held {
                    "lock held: a relay is leading"
                } else {
                    "lock free: no relay is running"
                }
            )),
            None => out.push_str(&format!(
                "Relay: no relay ever led this outbox{}\n\n",
                if self.relay.lock_held {
                    " (but the lock is held now)"
                } else {
                    ""
                }
            )),
        }
        self.parked.write(&mut out);
        out.push('\n');
        projection::write_table(&mut out, "Projections", &self.projections);
        out.push('\n');
        match self.kafka.state {
            KafkaState::NotConfigured => out.push_str(
                "Kafka: not configured (pass --brokers or set KAFKA_BROKERS to see consumer-group lag)\n",
            ),
            KafkaState::Skipped => out.push_str("Kafka: skipped (--no-kafka)\n"),
            KafkaState::Unreachable => out.push_str(&format!(
                "Kafka: unreachable at {}: {}\n",
                self.kafka.brokers.as_deref().unwrap_or("-"),
                self.kafka.error.as_deref().unwrap_or("-")
            )),
            KafkaState::Ok => {
                let mut groups = table([
                    "GROUP",
                    "TOPIC",
                    "PARTITION",
                    "COMMITTED",
                    "HIGH WATERMARK",
                    "LAG",
                ]);
                for group in &self.kafka.groups {
                    if group.partitions.is_empty() {
                        groups.add_row([
                            group.group.clone(),
                            "-".to_owned(),
                            "-".to_owned(),
                            group.note.clone().unwrap_or_else(|| "-".to_owned()),
                            "-".to_owned(),
                            "-".to_owned(),
                        ]);
                    }
                    for p in &group.partitions {
                        groups.add_row([
                            group.group.clone(),
                            p.topic.clone(),
                            p.partition.to_string(),
                            p.committed
                                .map_or_else(|| "none".to_owned(), |c| c.to_string()),
                            p.high_watermark.to_string(),
                            p.lag.to_string(),
                        ]);
                    }
                }
                section(
                    &mut out,
                    &format!(
                        "Kafka consumer groups ({})",
                        self.kafka.brokers.as_deref().unwrap_or("-")
                    ),
                    &groups,
                );
            }
        }
        out
    }
}

pub(crate) async fn run(store: &Store, global: &Global, args: StatusArgs) -> Result<()> {
    let head_position = store.head().await?;
    let outbox = store.store.outbox();
    let lag = outbox.lag().await?;
    let leader = outbox.leader().await?;
    let lock_held = outbox.is_led().await?;
    let parked = ParkedReport::load(store).await?;
    let projections = projection::list(store).await?;

    let mut kafka = KafkaView {
        state: KafkaState::NotConfigured,
        brokers: None,
        error: None,
        groups: Vec::new(),
    };
    let mut unreachable = None;
    if args.no_kafka {
        kafka.state = KafkaState::Skipped;
    } else if Kafka::configured(&global.kafka) {
        let client = Kafka::new(&global.kafka)?;
        kafka.brokers = Some(client.brokers().to_owned());
        match client.check().await {
            Err(err) => {
                let reason = thalo_kafka::error_chain(&err);
                kafka.state = KafkaState::Unreachable;
                kafka.error = Some(reason.clone());
                unreachable = Some(reason);
            }
            Ok(()) => {
                let mut groups = args.groups.clone();
                if groups.is_empty() {
                    // A Kafka-fed projection's group derives from its checkpoint key.
                    groups = projections
                        .iter()
                        .filter(|p| p.kind == Kind::KafkaFed)
                        .map(|p| client.projection_group(&p.name))
                        .collect();
                }
                let topics = store
                    .aggregate_types()
                    .await?
                    .iter()
                    .map(|t| client.topic(t))
                    .collect();
                match client.group_lag(groups, topics).await {
                    Ok(groups) => {
                        kafka.groups = groups;
                        kafka.state = KafkaState::Ok;
                    }
                    // Reachable a moment ago, failing now: still not a reason to hide
                    // the Postgres part.
                    Err(err) => {
                        let reason = err.one_line();
                        kafka.state = KafkaState::Unreachable;
                        kafka.error = Some(reason.clone());
                        unreachable = Some(reason);
                    }
                }
            }
        }
    }

    let report = StatusReport {
        schema: store.schema.as_str().to_owned(),
        head_position,
        outbox: OutboxView {
            pending: lag.pending,
            oldest_age_seconds: output::seconds(lag.oldest_age),
            parked_aggregates: lag.parked,
            oldest_age: lag.oldest_age,
        },
        relay: RelayView {
            leader: leader.map(|l| LeaderView {
                holder: l.holder,
                epoch: l.epoch,
                since: output::time(&l.since),
            }),
            lock_held,
        },
        parked,
        projections,
        kafka,
    };
    output::emit(&report, global.json)?;
    match unreachable {
        Some(reason) if args.strict => Err(CliError::KafkaUnreachable { reason }),
        _ => Ok(()),
    }
}
