//! The tool's errors, and how they end the process.

use std::process::ExitCode;

use thalo_kafka::rdkafka::error::KafkaError;

/// Why a command failed. Each variant prints what went wrong and returns the cause from
/// `source()`; `main` prints the whole chain on one line.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The command line is incomplete or contradicts itself (exit status 2, like
    /// clap's own usage errors).
    #[error("{message}")]
    Usage {
        /// What to do instead.
        message: String,
    },
    /// Postgres could not be reached.
    #[error("cannot connect to Postgres (DATABASE_URL)")]
    Connect {
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The schema has no event store tables.
    #[error("schema `{schema}` has no Thalo event store; run `thalo migrate` first")]
    NotMigrated {
        /// The schema.
        schema: String,
    },
    /// A statement of the tool failed.
    #[error("{context}")]
    Sql {
        /// What the tool was doing.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A call into the Thalo libraries failed.
    #[error(transparent)]
    Thalo(#[from] thalo::Error),
    /// The schema name is invalid.
    #[error(transparent)]
    Schema(#[from] thalo_postgres::SchemaNameError),
    /// A Kafka operation failed.
    #[error("{context}")]
    Kafka {
        /// What the tool was doing.
        context: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// Kafka is configured but unreachable, and `status --strict` was asked for.
    #[error("Kafka is unreachable: {reason}")]
    KafkaUnreachable {
        /// What the client saw.
        reason: String,
    },
    /// The aggregate or stream named on the command line is not parked.
    #[error("{what} is not parked")]
    NotParked {
        /// The aggregate or stream.
        what: String,
    },
    /// No checkpoint of that name exists.
    #[error("no projection or handler named `{name}` has a checkpoint in schema `{schema}`")]
    UnknownProjection {
        /// The name asked for.
        name: String,
        /// The schema.
        schema: String,
    },
    /// The consumer tried the requested re-drive and failed.
    #[error("consumer `{consumer}` could not re-drive {what}; it stays parked: {error}")]
    RedriveFailed {
        /// The stream.
        what: String,
        /// The consumer.
        consumer: String,
        /// Its error, from `parking_log`.
        error: String,
    },
    /// No consumer picked the re-drive request up in time.
    #[error(
        "consumer `{consumer}` did not re-drive the stream within {seconds} s (is it running?); \
         the request stays and is picked up when it runs"
    )]
    RedriveTimeout {
        /// The consumer.
        consumer: String,
        /// How long we waited.
        seconds: u64,
    },
    /// A watched rebuild did not finish in time.
    #[error(
        "version {version} of `{name}` is still {state} after the timeout (position {}, head {head})",
        position.map_or_else(|| "-".to_owned(), |p| p.to_string())
    )]
    RebuildTimeout {
        /// The projection.
        name: String,
        /// The version watched.
        version: u32,
        /// Its state at the timeout.
        state: &'static str,
        /// Its checkpoint's position.
        position: Option<u64>,
        /// The store's head.
        head: u64,
    },
    /// No version of that number is registered.
    #[error("projection `{name}` has no versions in schema `{schema}`")]
    UnknownVersions {
        /// The projection.
        name: String,
        /// The schema.
        schema: String,
    },
    /// A dead-letter message could not be found.
    #[error("no message at offset {offset} of partition {partition} of topic `{topic}`")]
    NoMessage {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The offset.
        offset: i64,
    },
    /// Writing to standard output failed.
    #[error("cannot write the output")]
    Output {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// JSON output could not be encoded.
    #[error("cannot encode the JSON output")]
    Json {
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// A blocking Kafka task did not finish.
    #[error("a Kafka task failed")]
    Task {
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
}

pub(crate) type Result<T, E = CliError> = std::result::Result<T, E>;

impl CliError {
    /// A usage error (exit status 2).
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        CliError::Usage {
            message: message.into(),
        }
    }

    /// `map_err` for a failed statement.
    pub(crate) fn sql(context: &'static str) -> impl FnOnce(sqlx::Error) -> CliError {
        move |source| CliError::Sql { context, source }
    }

    /// `map_err` for a failed Kafka call.
    pub(crate) fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> CliError {
        move |source| CliError::Kafka {
            context: context.into(),
            source,
        }
    }

    /// The process's exit status for this error.
    pub(crate) fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage { .. } => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }

    /// The error and its causes on one line, for `error: ...`.
    pub(crate) fn one_line(&self) -> String {
        let text = thalo_kafka::error_chain(self);
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_with_every_cause() {
        let err = CliError::Thalo(thalo::Error::store("reading the outbox", "boom\nagain"));
        assert_eq!(
            err.one_line(),
            "event store error: reading the outbox: boom again"
        );
        assert_eq!(CliError::usage("x").exit_code(), ExitCode::from(2));
        assert_eq!(
            CliError::NotParked { what: "y".into() }.exit_code(),
            ExitCode::FAILURE
        );
    }
}
