//! One Kafka configuration for every client Thalo creates.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::ClientConfig;
use thalo::Error;

use crate::TopicNaming;

/// The environment variable with the bootstrap servers.
pub const BROKERS_ENV: &str = "KAFKA_BROKERS";

/// The environment variable naming a properties file (see [`KafkaConfig::from_file`]).
pub const CONFIG_FILE_ENV: &str = "THALO_KAFKA_CONFIG";

/// The prefix of environment variables that set librdkafka properties:
/// `THALO_KAFKA_SECURITY_PROTOCOL=SASL_SSL` sets `security.protocol`.
pub const PROPERTY_ENV_PREFIX: &str = "THALO_KAFKA_";

/// Where the Kafka cluster is and how to talk to it: bootstrap servers, any librdkafka
/// properties (TLS, SASL, timeouts, ...), the topic naming and the prefix of the
/// projections' consumer groups ([`with_group_prefix`](KafkaConfig::with_group_prefix)).
/// The relay ([`KafkaRelay::with_kafka_config`](crate::KafkaRelay::with_kafka_config)) and the
/// consumer ([`KafkaConsumer::from_kafka_config`](crate::KafkaConsumer::from_kafka_config))
/// take the same one, and its properties reach every client they create: the relay's
/// producer and admin client, the consumer, its dead-letter producer and its admin
/// client. Sharing it also keeps the relay and the consumer on the same topic names.
///
/// ```
/// use thalo_kafka::{KafkaConfig, TopicNaming};
///
/// let config = KafkaConfig::new("broker-1:9093,broker-2:9093")
///     .set("security.protocol", "SASL_SSL")
///     .set("sasl.mechanisms", "SCRAM-SHA-512")
///     .set("sasl.username", "bank")
///     .set("sasl.password", "secret")
///     .set("ssl.ca.location", "/etc/ssl/certs/ca.pem")
///     .with_topic_naming(TopicNaming::prefixed("prod."));
/// assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
/// assert_eq!(config.topic_naming().topic("bank_account"), "prod.bank_account");
/// // Secrets are not printed.
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
///
/// TLS and SASL (PLAIN, SCRAM) are built in: librdkafka is built with OpenSSL compiled
/// from source (`rdkafka`'s `ssl-vendored` feature), so nothing beyond a C toolchain,
/// `make` and `perl` is needed on the build machine, and the TLS library does not
/// depend on what the system has installed.
#[derive(Clone, Default)]
pub struct KafkaConfig {
    brokers: String,
    properties: BTreeMap<String, String>,
    topic_naming: TopicNaming,
    group_prefix: String,
}

impl KafkaConfig {
    /// A configuration for the cluster at `brokers` (`host:port[,host:port...]`).
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            ..KafkaConfig::default()
        }
    }

    /// From the environment: the bootstrap servers from `KAFKA_BROKERS` (default
    /// `127.0.0.1:9092`), then the properties of the file named by
    /// `THALO_KAFKA_CONFIG` (if set), then every `THALO_KAFKA_<NAME>` variable as the
    /// property `<name>` with `_` read as `.` (`THALO_KAFKA_SASL_PASSWORD` sets
    /// `sasl.password`); later sources win.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Config`] when the file cannot be read or parsed.
    pub fn from_env() -> Result<Self, Error> {
        let brokers = std::env::var(BROKERS_ENV).unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
        let mut config = KafkaConfig::new(brokers);
        if let Ok(path) = std::env::var(CONFIG_FILE_ENV) {
            config = config.merge_file(path)?;
        }
        for (name, value) in std::env::vars() {
            if let Some(key) = name.strip_prefix(PROPERTY_ENV_PREFIX) {
                if key == "CONFIG" || key.is_empty() {
                    continue;
                }
                config = config.set(key.to_ascii_lowercase().replace('_', "."), value);
            }
        }
        Ok(config)
    }

    /// Reads properties from a file of `key=value` lines (the format of librdkafka's and
    /// the Java client's property files; `#` starts a comment line). A
    /// `bootstrap.servers` line sets the brokers.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Config`] when the file cannot be read or a line has no `=`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        KafkaConfig::default().merge_file(path)
    }

    fn merge_file(mut self, path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!(
                "cannot read Kafka properties {}: {e}",
                path.display()
            ))
        })?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(Error::config(format!(
                    "{}:{}: expected `key=value`, found `{line}`",
                    path.display(),
                    n + 1
                )));
            };
            self = self.set(key.trim(), value.trim());
        }
        Ok(self)
    }

    /// Sets a librdkafka property (`bootstrap.servers` sets the brokers). Properties
    /// the relay's guarantees depend on are still fixed by the relay (see
    /// [`KafkaRelay::set`](crate::KafkaRelay::set)).
    #[must_use]
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let (key, value) = (key.into(), value.into());
        if key == "bootstrap.servers" {
            self.brokers = value;
        } else {
            self.properties.insert(key, value);
        }
        self
    }

    /// Parses `key=value` (as given to `-X` on the command line) and sets it.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Config`] when there is no `=`.
    pub fn set_pair(self, pair: &str) -> Result<Self, Error> {
        match pair.split_once('=') {
            Some((key, value)) => Ok(self.set(key.trim(), value.trim())),
            None => Err(Error::config(format!(
                "expected a librdkafka property as `key=value`, found `{pair}`"
            ))),
        }
    }

    /// The topic naming of the relay and the consumers built from this configuration.
    #[must_use]
    pub fn with_topic_naming(mut self, naming: TopicNaming) -> Self {
        self.topic_naming = naming;
        self
    }

    /// Puts `prefix` in front of the consumer group of every projection run by a
    /// consumer built from this configuration: a projection's group is
    /// `<prefix><checkpoint key>` (`prod.balances`, `prod.balances@v2`; see
    /// [`projection_group_id`](crate::projection_group_id)). Use it when several
    /// deployments (staging and production, two services with a projection of the same
    /// name) share a Kafka cluster. Default: no prefix. The `group_id` given to
    /// [`KafkaConsumer::from_kafka_config`](crate::KafkaConsumer::from_kafka_config) for a
    /// plain handler is used as given.
    ///
    /// ```
    /// use thalo_kafka::KafkaConfig;
    ///
    /// let config = KafkaConfig::new("broker:9092").with_group_prefix("prod.");
    /// assert_eq!(config.group_prefix(), "prod.");
    /// ```
    #[must_use]
    pub fn with_group_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.group_prefix = prefix.into();
        self
    }

    /// The prefix of projections' consumer groups (empty by default).
    pub fn group_prefix(&self) -> &str {
        &self.group_prefix
    }

    /// The bootstrap servers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// A property, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.properties.get(key).map(String::as_str)
    }

    /// Every property set, in key order (the brokers are not among them).
    pub fn properties(&self) -> impl Iterator<Item = (&str, &str)> {
        self.properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The topic naming.
    pub fn topic_naming(&self) -> &TopicNaming {
        &self.topic_naming
    }

    /// An rdkafka client configuration with the brokers and every property.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    /// Connects to the cluster and fetches its metadata, within `timeout`: a quick
    /// check at start-up that the brokers are reachable and that TLS and SASL are set
    /// up right. The error says what the client saw (a certificate that does not
    /// verify, a failed SASL authentication, a refused connection), instead of the
    /// relay or consumer retrying in the background.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Broker`] when the metadata cannot be fetched, with the client's
    /// last error, and [`Error::Config`] for an invalid property.
    pub async fn check(&self, timeout: Duration) -> Result<(), Error> {
        let config = self.clone();
        tokio::task::spawn_blocking(move || config.check_blocking(timeout))
            .await
            .map_err(|e| Error::broker("checking the Kafka connection", e))?
    }

    fn check_blocking(&self, timeout: Duration) -> Result<(), Error> {
        let context = LastError::default();
        let mut config = self.client_config();
        // The client's own lines (TLS handshake, SASL) come through `LastError::log`.
        config.set_log_level(RDKafkaLogLevel::Warning);
        let producer: BaseProducer<LastError> = config
            .create_with_context(context)
            .map_err(|e| Error::config(format!("invalid Kafka configuration: {e}")))?;
        match producer.client().fetch_metadata(None, timeout) {
            Ok(_) => Ok(()),
            Err(err) => {
                // Error events wait in the client's queue until it is polled.
                producer.poll(Duration::from_millis(100));
                let seen = producer.context().last();
                Err(Error::broker(
                    format!(
                        "cannot reach the Kafka cluster at {} within {} ms{}",
                        self.brokers,
                        timeout.as_millis(),
                        seen.map(|e| format!(": {e}")).unwrap_or_default()
                    ),
                    err,
                ))
            }
        }
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let secret = k.contains("password") || k.contains("secret") || k.ends_with(".pem");
                (k.as_str(), if secret { "***" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("properties", &properties)
            .field("topic_naming", &self.topic_naming)
            .field("group_prefix", &self.group_prefix)
            .finish()
    }
}

/// Keeps what the client reported (TLS handshake, SASL authentication, transport) for
/// [`KafkaConfig::check`]: the last failure logged by a broker thread (which says why:
/// "SSL handshake failed: ... certificate verify failed"), else the last error.
#[derive(Default)]
struct LastError {
    error: Arc<Mutex<Option<String>>>,
    failure: Arc<Mutex<Option<String>>>,
}

impl LastError {
    fn last(&self) -> Option<String> {
        let failure = self.failure.lock().ok().and_then(|f| f.clone());
        failure.or_else(|| self.error.lock().ok().and_then(|e| e.clone()))
    }
}

impl rdkafka::producer::ProducerContext for LastError {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

impl ClientContext for LastError {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) && fac == "FAIL" {
            if let Ok(mut failure) = self.failure.lock() {
                *failure = Some(log_message.to_owned());
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Ok(mut last) = self.error.lock() {
            *last = Some(format!("{error}: {reason}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_properties_file_sets_brokers_and_properties() {
        let path =
            std::env::temp_dir().join(format!("thalo-kafka-{}.properties", uuid::Uuid::new_v4()));
        std::fs::write(
            &path,
            "# a comment\nbootstrap.servers = b1:9093,b2:9093\nsecurity.protocol=SASL_SSL\n\nsasl.password=s3cr=t\n",
        )
        .expect("write");
        let config = KafkaConfig::from_file(&path).expect("parse");
        assert_eq!(config.brokers(), "b1:9093,b2:9093");
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(
            config.get("sasl.password"),
            Some("s3cr=t"),
            "split at the first `=`"
        );
        assert!(!format!("{config:?}").contains("s3cr"));

        std::fs::write(&path, "no equals sign\n").expect("write");
        let err = KafkaConfig::from_file(&path).expect_err("bad line");
        assert!(
            err.to_string().contains(":1: expected `key=value`"),
            "{err}"
        );
        std::fs::remove_file(&path).expect("remove");
        assert!(
            KafkaConfig::from_file(&path).is_err(),
            "a missing file is an error"
        );
    }

    #[test]
    fn pairs_and_the_client_config() {
        let config = KafkaConfig::new("k:9092")
            .set_pair("linger.ms=5")
            .expect("pair")
            .set_pair("bootstrap.servers=other:9092")
            .expect("brokers");
        assert!(KafkaConfig::new("k").set_pair("nothing").is_err());
        let client = config.client_config();
        assert_eq!(client.get("bootstrap.servers"), Some("other:9092"));
        assert_eq!(client.get("linger.ms"), Some("5"));
        assert_eq!(config.properties().count(), 1);
    }
}
