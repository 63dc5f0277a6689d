//! The command line: global options and subcommands (clap derive).

use clap::{Args, Parser, Subcommand};
use thalo_postgres::SchemaName;

/// Operates a Thalo service: outbox and projection lag, parked aggregates and streams,
/// dead letters, projection resets, republishing and migrations.
///
/// Postgres is named by `--database-url` (or `DATABASE_URL`); Kafka, for the commands
/// that talk to it, by `--brokers` (or `KAFKA_BROKERS`), the properties file named by
/// `THALO_KAFKA_CONFIG`, the `THALO_KAFKA_<NAME>` variables and `-X key=value`, as for
/// `thalo-relay`. Exit status: 0 on success, 1 on an error, 2 on a usage error.
#[derive(Debug, Parser)]
#[command(name = "thalo", version, propagate_version = true)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub(crate) struct Global {
    /// Postgres connection URL of the event store (required by every command but `dlq`).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Schema of the event store's tables.
    #[arg(long, env = "THALO_SCHEMA", global = true, default_value = SchemaName::DEFAULT)]
    pub schema: String,

    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// How long to wait for a Postgres connection, in milliseconds.
    #[arg(
        long,
        env = "THALO_PG_ACQUIRE_TIMEOUT_MS",
        global = true,
        default_value_t = 10_000
    )]
    pub pg_acquire_timeout_ms: u64,

    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// Where Kafka is, as `thalo-relay` takes it.
#[derive(Debug, Args)]
pub(crate) struct KafkaArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]` (default `127.0.0.1:9092`
    /// for the commands that need Kafka; `status` leaves Kafka out when no broker is
    /// configured at all).
    #[arg(long, env = "KAFKA_BROKERS", global = true)]
    pub brokers: Option<String>,

    /// librdkafka properties, `key=value` (repeatable), e.g. `-X security.protocol=ssl`.
    /// They come after those of the file named by `THALO_KAFKA_CONFIG` and of the
    /// `THALO_KAFKA_<NAME>` variables, and win over them.
    #[arg(
        short = 'X',
        long = "kafka-property",
        global = true,
        value_parser = parse_property
    )]
    pub properties: Vec<(String, String)>,

    /// Prefix of topic names, as given to the relay: events of aggregate `x` are in
    /// topic `<prefix>x`.
    #[arg(long, env = "THALO_TOPIC_PREFIX", global = true, default_value = "")]
    pub topic_prefix: String,

    /// Prefix of the projections' consumer groups, as given to their consumers
    /// (`KafkaConfig::with_group_prefix`): the group of a Kafka-fed projection is
    /// `<prefix><checkpoint key>`, e.g. `balances` or `balances@v2`.
    #[arg(long, env = "THALO_GROUP_PREFIX", global = true, default_value = "")]
    pub group_prefix: String,

    /// How long to wait for Kafka to answer, in milliseconds.
    // No `THALO_KAFKA_*` variable: `KafkaConfig::from_env` reads those as properties.
    #[arg(long, global = true, default_value_t = 5_000)]
    pub kafka_timeout_ms: u64,
}

/// Parses `key=value`.
pub(crate) fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, found `{text}`"))
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Outbox depth and age, the relay leader, parked aggregates and streams, every
    /// projection's lag, and the Kafka consumer groups' lag per partition.
    ///
    /// When Kafka is configured but unreachable, the Postgres part is printed and the
    /// Kafka part says why it is missing; the exit status is still 0 unless `--strict`.
    Status(StatusArgs),
    /// Aggregates the relay parked and streams consumers parked: list, retry, skip.
    #[command(subcommand)]
    Parked(ParkedCommand),
    /// Read dead-letter topics (no consumer group, nothing committed).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Projections and event handlers with checkpoints in the store: list, reset.
    #[command(subcommand)]
    Projection(ProjectionCommand),
    /// Puts stored events back into the outbox, so the running relay publishes them
    /// again, in order per aggregate and fenced by its epoch.
    ///
    /// Safe for existing consumers: they drop every event whose sequence they have
    /// applied already (per-stream sequences), so only consumers that lack the events
    /// (a new consumer group, a projection being rebuilt, a topic that lost them to
    /// retention) act on them.
    Republish(RepublishArgs),
    /// Creates the event store's schema and tables, or brings them up to date.
    Migrate,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// A Kafka consumer group to report (repeatable). By default: the groups of the
    /// Kafka-fed projections found in `stream_checkpoints`, `<--group-prefix><checkpoint
    /// key>`, as their consumers derive them.
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,

    /// Exit with status 1 when Kafka is configured but unreachable (after printing
    /// everything else).
    #[arg(long)]
    pub strict: bool,

    /// Leave Kafka out even when a broker is configured.
    #[arg(long, conflicts_with = "strict")]
    pub no_kafka: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ParkedCommand {
    /// The aggregates the relay parked and the streams consumers parked, oldest first.
    List,
    /// Releases an aggregate the relay parked: its events are published again, in
    /// order, from the refused one on (after the cause was fixed).
    ///
    /// A stream a consumer parked is re-driven by the consumer's own code
    /// (`PgEventStore::redrive_projection` / `redrive_handler`), which this tool does
    /// not have; it can only skip (`thalo parked skip ... --consumer NAME`).
    Retry(RetryArgs),
    /// Skips the refused event of an aggregate the relay parked (it stays in the store
    /// and is never published; consumers will park on the gap in turn), or, with
    /// `--consumer`, the first parked event of a stream that consumer parked (the stream
    /// stays parked at the next event until its consumer re-drives it).
    Skip(SkipArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RetryArgs {
    /// The aggregate type, e.g. `bank_account`.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// Not supported: a consumer's parked stream is re-driven by the consumer's code.
    #[arg(long, value_name = "NAME")]
    pub consumer: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct SkipArgs {
    /// The aggregate type, e.g. `bank_account`.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// Why, recorded in `parking_log` with the decision.
    #[arg(long)]
    pub reason: String,
    /// Skip in the stream this consumer (projection or handler name) parked, instead of
    /// the relay's parked aggregate.
    #[arg(long, value_name = "NAME")]
    pub consumer: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// The messages of dead-letter topics, with why each one is there.
    List(DlqListArgs),
    /// One dead-letter message: every header and the value.
    Show(DlqShowArgs),
    /// Asks the running consumer that parked a stream to re-drive it: the consumer picks
    /// the request up within about a second and applies the stream from the store, in
    /// order and exactly once, with its own code (dead letters are the record; the
    /// store is the source). `--wait-secs` waits for the outcome.
    Redrive(DlqRedriveArgs),
}

#[derive(Debug, Args)]
pub(crate) struct DlqRedriveArgs {
    /// The consumer that parked the stream: a projection's name (`name@vN` for a later
    /// version) or a handler's consumer group, as `thalo parked list` shows it.
    #[arg(long)]
    pub consumer: String,
    /// The stream's aggregate type.
    pub aggregate_type: String,
    /// The stream's aggregate id.
    pub aggregate_id: String,
    /// Why, for `parking_log`.
    #[arg(long, default_value = "requested with thalo dlq redrive")]
    pub note: String,
    /// Wait up to this many seconds for the re-drive; exit status 1 if it failed or did
    /// not happen in time (no consumer running, say).
    #[arg(long, value_name = "SECONDS")]
    pub wait_secs: Option<u64>,
}

#[derive(Debug, Args)]
pub(crate) struct DlqListArgs {
    /// A dead-letter topic to read (repeatable). By default every topic whose name ends
    /// with `--suffix`.
    #[arg(long = "topic", value_name = "TOPIC")]
    pub topics: Vec<String>,

    /// The dead-letter suffix the consumers use (`KafkaConsumer::with_dead_letter_suffix`).
    #[arg(long, default_value = ".dlq")]
    pub suffix: String,

    /// The most recent messages to show per partition.
    #[arg(long, default_value_t = 100)]
    pub limit: u64,
}

#[derive(Debug, Args)]
pub(crate) struct DlqShowArgs {
    /// The dead-letter topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ProjectionCommand {
    /// Every projection and handler with a checkpoint: position or streams, and lag.
    List,
    /// Deletes a projection's checkpoints (`checkpoints`, `stream_checkpoints`) and its
    /// parked streams, in one transaction, so that it starts again from the beginning.
    ///
    /// Stop the projection's runners first. The read-model tables are the projection's
    /// own: clear them yourself. A Kafka-fed projection also needs its consumer group's
    /// offsets reset (`--reset-group`), or it resumes where the group left off.
    Reset(ResetArgs),
    /// The versions of a versioned projection: building, live or retired, with their
    /// tables and positions.
    Versions {
        /// The projection's name.
        name: String,
    },
    /// Watches the rebuild of a new version until it is live, with its progress (rate,
    /// ETA). The rebuild itself runs in the service that deployed the version (e.g.
    /// `PgSubscription::with_read_model`, `bank serve --balances-version N`): it builds
    /// the version from the start of the store beside the live one and switches readers
    /// over once it has caught up.
    Rebuild(RebuildArgs),
    /// Makes a registered version live (a rollback to a retired version, say): its views
    /// point at its tables, in one transaction.
    Promote(PromoteArgs),
    /// Drops a version that is not live: its tables, checkpoints and parked streams.
    Drop(DropVersionArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RebuildArgs {
    /// The projection's name.
    pub name: String,
    /// The version being built.
    #[arg(value_name = "VERSION")]
    pub number: u32,
    /// Give up after this many seconds (exit status 1); default: wait.
    #[arg(long, value_name = "SECONDS")]
    pub timeout_secs: Option<u64>,
    /// How often to look, in milliseconds.
    #[arg(long, default_value_t = 500, value_name = "MS")]
    pub interval_ms: u64,
}

#[derive(Debug, Args)]
pub(crate) struct PromoteArgs {
    /// The projection's name.
    pub name: String,
    /// The version to make live.
    #[arg(value_name = "VERSION")]
    pub number: u32,
    /// Really do it.
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub(crate) struct DropVersionArgs {
    /// The projection's name.
    pub name: String,
    /// The version to drop (not the live one).
    #[arg(value_name = "VERSION")]
    pub number: u32,
    /// Really do it.
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ResetArgs {
    /// The projection's name (its checkpoint key).
    pub name: String,
    /// Really do it.
    #[arg(long)]
    pub yes: bool,
    /// Also delete the Kafka consumer group (its committed offsets), so that the
    /// projection re-reads its topics from the start. The group must have no members.
    #[arg(long)]
    pub reset_group: bool,
    /// The consumer group to delete with `--reset-group` (default: the projection's
    /// own, `<--group-prefix><name>`; name a group here that a projection used before
    /// groups were derived from its name).
    #[arg(long, requires = "reset_group", value_name = "GROUP")]
    pub group: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct RepublishArgs {
    /// First global position to republish (inclusive).
    #[arg(long, value_name = "POSITION")]
    pub from: u64,
    /// Last global position to republish (inclusive; default: the store's head when the
    /// command starts).
    #[arg(long, value_name = "POSITION")]
    pub to: Option<u64>,
    /// Only events of this aggregate type.
    #[arg(long, value_name = "TYPE")]
    pub aggregate_type: Option<String>,
    /// Outbox rows inserted per transaction.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: u64,
    /// Count the events, insert nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_properties() {
        assert_eq!(
            parse_property("compression.type = lz4"),
            Ok(("compression.type".into(), "lz4".into()))
        );
        assert_eq!(parse_property("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_property("nokey").is_err());
        assert!(parse_property("=v").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "thalo", "parked", "list", "--schema", "bank", "--json", "-X", "a=b",
        ])
        .expect("parses");
        assert_eq!(cli.global.schema, "bank");
        assert!(cli.global.json);
        assert_eq!(cli.global.kafka.properties, [("a".into(), "b".into())]);
        assert!(matches!(cli.command, Command::Parked(ParkedCommand::List)));
    }
}
