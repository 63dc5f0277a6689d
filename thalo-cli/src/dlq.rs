//! `thalo dlq`: reading dead-letter topics.
//!
//! A consumer writes every message it did not apply to `<topic>.dlq` with headers that
//! say why (`thalo_dlq_reason`: `decode`, `handler`, `gap`, `held`; `thalo_dlq_error`)
//! and where it came from (`thalo_dlq_topic`, `_partition`, `_offset`, `_group`), next
//! to the original message's own headers (see `thalo_kafka::message::header`).
//!
//! The dead-letter topic is the record, not the way back: the consumer parked the
//! message's stream and holds every later event of it until the stream is re-driven
//! *from the store*, through the consumer's own projection or handler code
//! (`PgEventStore::redrive_projection` / `redrive_handler`), exactly once and in order.
//! Publishing a dead letter back to its topic would not do that (the consumer holds it
//! again while the stream is parked, and drops it as a duplicate once the stream moved
//! past it). So `thalo dlq redrive` records a request (`PgEventStore::request_redrive`)
//! that the running consumer picks up within about a second and carries out with its
//! own code; a failed attempt withdraws the request and leaves its error in
//! `parking_log`.

use serde::Serialize;

use crate::args::{DlqCommand, DlqListArgs, DlqRedriveArgs, DlqShowArgs, Global};
use crate::error::{CliError, Result};
use crate::kafka::{DeadLetter, DeadLetterSummary, HeaderValue, Kafka};
use crate::output::{self, clip, section, table, Report};
use crate::store::Store;

pub(crate) async fn run(global: &Global, command: DlqCommand) -> Result<()> {
    let kafka = Kafka::new(&global.kafka)?;
    match command {
        DlqCommand::List(args) => output::emit(&list(&kafka, args).await?, global.json),
        DlqCommand::Show(args) => output::emit(&show(&kafka, args).await?, global.json),
        DlqCommand::Redrive(_) => Err(CliError::usage(
            "dlq redrive needs the store: pass --database-url",
        )),
    }
}

#[derive(Debug, Serialize)]
struct ListReport {
    /// The topics read.
    topics: Vec<String>,
    messages: Vec<DeadLetterSummary>,
}

impl Report for ListReport {
    fn text(&self) -> String {
        let mut rows = table([
            "TOPIC",
            "PARTITION",
            "OFFSET",
            "REASON",
            "GROUP",
            "AGGREGATE",
            "SEQUENCE",
            "FROM",
            "AT",
            "ERROR",
        ]);
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        for m in &self.messages {
            let aggregate = match (&m.aggregate_type, &m.aggregate_id) {
                (Some(t), Some(id)) => format!("{t} `{id}`"),
                (None, Some(id)) => format!("`{id}`"),
                _ => "-".to_owned(),
            };
            let from = match (&m.original_topic, &m.original_partition, &m.original_offset) {
                (Some(t), Some(p), Some(o)) => format!("{t}/{p}@{o}"),
                _ => "-".to_owned(),
            };
            rows.add_row([
                m.topic.clone(),
                m.partition.to_string(),
                m.offset.to_string(),
                dash(&m.reason),
                dash(&m.group),
                aggregate,
                dash(&m.sequence),
                from,
                dash(&m.dead_lettered_at),
                clip(m.error.as_deref().unwrap_or("-"), 60),
            ]);
        }
        let mut out = String::new();
        let heading = if self.topics.is_empty() {
            "Dead letters (no dead-letter topics found)".to_owned()
        } else {
            format!("Dead letters ({})", self.topics.join(", "))
        };
        section(&mut out, &heading, &rows);
        out
    }
}

async fn list(kafka: &Kafka, args: DlqListArgs) -> Result<ListReport> {
    let (topics, messages) = kafka
        .dead_letters(args.topics, args.suffix, args.limit)
        .await?;
    Ok(ListReport {
        topics,
        messages: messages.iter().map(DeadLetterSummary::from).collect(),
    })
}

#[derive(Debug, Serialize)]
struct ShowReport {
    #[serde(flatten)]
    summary: DeadLetterSummary,
    /// The message's own timestamp.
    timestamp: Option<String>,
    key: Option<String>,
    /// Every header, in order.
    headers: Vec<HeaderValue>,
    /// The value: JSON when it parses as JSON, else text.
    value: Option<serde_json::Value>,
}

impl Report for ShowReport {
    fn text(&self) -> String {
        let s = &self.summary;
        let mut out = format!(
            "{} partition {} offset {}\n",
            s.topic, s.partition, s.offset
        );
        out.push_str(&format!(
            "key: {}\ntimestamp: {}\n\n",
            self.key.as_deref().unwrap_or("-"),
            self.timestamp.as_deref().unwrap_or("-")
        ));
        let mut headers = table(["HEADER", "VALUE"]);
        for h in &self.headers {
            headers.add_row([
                h.key.clone(),
                h.value.clone().unwrap_or_else(|| "(null)".to_owned()),
            ]);
        }
        section(&mut out, "Headers", &headers);
        out.push_str("\nValue\n");
        match &self.value {
            None => out.push_str("(null)\n"),
            Some(serde_json::Value::String(text)) => {
                out.push_str(text);
                out.push('\n');
            }
            Some(value) => {
                let pretty =
                    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
                out.push_str(&pretty);
                out.push('\n');
            }
        }
        out
    }
}

async fn show(kafka: &Kafka, args: DlqShowArgs) -> Result<ShowReport> {
    let message: DeadLetter = kafka
        .message(args.topic, args.partition, args.offset)
        .await?;
    let value = message.value.as_deref().map(|bytes| {
        serde_json::from_slice(bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
        })
    });
    Ok(ShowReport {
        summary: DeadLetterSummary::from(&message),
        timestamp: message.timestamp.as_ref().map(output::time),
        key: message.key.clone(),
        headers: message.headers.clone(),
        value,
    })
}

/// The outcome of `thalo dlq redrive`.
#[derive(Debug, Serialize)]
struct RedriveReport {
    consumer: String,
    aggregate_type: String,
    aggregate_id: String,
    /// `requested`, or with `--wait-secs`: `redriven`.
    outcome: &'static str,
}

impl Report for RedriveReport {
    fn text(&self) -> String {
        match self.outcome {
            "redriven" => format!(
                "`{}` re-drove {} `{}`: the stream is applied and no longer parked\n",
                self.consumer, self.aggregate_type, self.aggregate_id
            ),
            _ => format!(
                "asked `{}` to re-drive {} `{}`: the running consumer picks it up within about a \
                 second (thalo parked list shows the outcome)\n",
                self.consumer, self.aggregate_type, self.aggregate_id
            ),
        }
    }
}

/// Records a re-drive request for the consumer that parked the stream, and with
/// `--wait-secs` waits until the stream is no longer parked, or the consumer reports the
/// re-drive failed.
pub(crate) async fn redrive(store: &Store, args: DlqRedriveArgs, json: bool) -> Result<()> {
    let parked = store
        .store
        .request_redrive(
            &args.consumer,
            &args.aggregate_type,
            &args.aggregate_id,
            &args.note,
        )
        .await?;
    if !parked {
        return Err(CliError::NotParked {
            what: format!(
                "{} `{}` (consumer `{}`)",
                args.aggregate_type, args.aggregate_id, args.consumer
            ),
        });
    }
    let mut outcome = "requested";
    if let Some(wait) = args.wait_secs {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
        loop {
            let stream = store
                .store
                .parked_stream(&args.consumer, &args.aggregate_type, &args.aggregate_id)
                .await?;
            let Some(stream) = stream else {
                outcome = "redriven";
                break;
            };
            let pending = store
                .store
                .redrive_requests(&args.consumer)
                .await?
                .iter()
                .any(|(t, id)| *t == args.aggregate_type && *id == args.aggregate_id);
            if !pending {
                return Err(CliError::RedriveFailed {
                    what: format!("{} `{}`", args.aggregate_type, args.aggregate_id),
                    consumer: args.consumer,
                    error: last_redrive_error(
                        store,
                        &stream.consumer,
                        &args.aggregate_type,
                        &args.aggregate_id,
                    )
                    .await?,
                });
            }
            if std::time::Instant::now() >= deadline {
                return Err(CliError::RedriveTimeout {
                    consumer: args.consumer,
                    seconds: wait,
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    output::emit(
        &RedriveReport {
            consumer: args.consumer,
            aggregate_type: args.aggregate_type,
            aggregate_id: args.aggregate_id,
            outcome,
        },
        json,
    )
}

/// The error of the stream's last failed re-drive, from `parking_log`.
async fn last_redrive_error(
    store: &Store,
    consumer: &str,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<String> {
    let detail: Option<String> = sqlx::query_scalar(&format!(
        "SELECT detail FROM {} WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3 \
         AND action = 'redrive_failed' ORDER BY id DESC LIMIT 1",
        store.schema.qualify("parking_log")
    ))
    .bind(consumer)
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_optional(&store.pool)
    .await
    .map_err(CliError::sql("reading parking_log"))?;
    Ok(detail.unwrap_or_else(|| "(no detail)".to_owned()))
}
