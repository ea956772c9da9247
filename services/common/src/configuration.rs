//! Typed settings, parsed before anything connects.
//!
//! Every service builds its settings tree from the same pieces and loads it in three layers:
//! the service's defaults, then the TOML file named by `FLASH_SALE_CONFIG`, then environment
//! variables prefixed `FLASH_SALE_` with `__` between levels (`FLASH_SALE_REDIS__URL`).

use std::fmt;
use std::net::SocketAddr;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Environment variable naming an optional TOML configuration file.
pub const CONFIG_FILE_ENV: &str = "FLASH_SALE_CONFIG";
/// Prefix of every environment variable the services read.
pub const ENV_PREFIX: &str = "FLASH_SALE_";

/// Loads settings: `defaults`, then the file named by `FLASH_SALE_CONFIG`, then the environment.
pub fn load<T: Serialize + DeserializeOwned>(defaults: T) -> Result<T, Box<figment::Error>> {
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Ok(path) = std::env::var(CONFIG_FILE_ENV) {
        figment = figment.merge(Toml::file_exact(path));
    }
    figment
        .merge(Env::prefixed(ENV_PREFIX).ignore(&["config"]).split("__"))
        .extract()
        .map_err(Box::new)
}

/// A value that must never reach a log line: `Debug` prints a placeholder, and the memory is
/// wiped when it is dropped (`secrecy`). `Serialize` hands the value out only because figment
/// reads a service's defaults through it ([`load`]); nothing else serializes settings.
#[derive(Clone, Default)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The secret itself; call only where it is handed to the thing that needs it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_empty() {
            "<empty>"
        } else {
            "<redacted>"
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.expose())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        SecretString::deserialize(deserializer).map(Self)
    }
}

/// Where a listener binds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerSettings {
    /// Interface to bind; `0.0.0.0` in a pod, `127.0.0.1` in tests.
    pub host: String,
    /// Port to bind; 0 picks a free one (tests).
    pub port: u16,
}

impl ListenerSettings {
    pub fn new(port: u16) -> Self {
        Self {
            host: "0.0.0.0".into(),
            port,
        }
    }

    pub fn address(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        format!("{}:{}", self.host, self.port).parse()
    }
}

/// How to reach Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisSettings {
    /// `redis://[:password@]host:port[/db]`; in cluster mode, any node (more may follow, comma
    /// separated; the first one's password is used on every node). It may carry the password,
    /// so it is a secret.
    pub url: Secret,
    /// Redis Cluster: keys carry a per-activity hash tag, so every script stays in one slot.
    pub cluster: bool,
    /// Upper bound on Redis calls in flight from this process; past it, callers wait
    /// (the buy path answers 503 when it cannot get a slot within `acquire_timeout_ms`).
    pub max_in_flight: usize,
    /// How long a request waits for one of the `max_in_flight` slots.
    pub acquire_timeout_ms: u64,
    /// Timeout of one Redis call; a stuck Redis must not hold requests forever. Redis answers
    /// in microseconds, so this only measures queueing: keep it generous (a CPU-starved pod under
    /// the seed's 1000-connection load saw 1 s exceeded) and shed load at the gateway instead.
    pub response_timeout_ms: u64,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("redis://127.0.0.1:6379"),
            cluster: false,
            max_in_flight: 4096,
            acquire_timeout_ms: 200,
            response_timeout_ms: 3000,
        }
    }
}

/// How to reach MySQL (or MariaDB).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatabaseSettings {
    /// `mysql://user:password@host:port/database`; carries the password, so it is a secret.
    pub url: Secret,
    /// Pool size: the consumer holds one per batch, queries and admin calls share the rest.
    pub max_connections: u32,
    /// How long a caller waits for a pooled connection before failing.
    pub acquire_timeout_ms: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("mysql://root@127.0.0.1:3306/flash_sale"),
            max_connections: 10,
            acquire_timeout_ms: 3000,
        }
    }
}

/// How to reach the Kafka-protocol broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Topic that carries accepted orders from the buy path to the consumer.
    pub topic: String,
    /// Consumer group of the order consumer; every order-service pod joins it.
    pub group_id: String,
    /// How long a publish may take, retries included, before the buy path gives up, undoes the
    /// reservation and answers 503. Keep it well under the reconciler's reservation deadline.
    pub message_timeout_ms: u64,
    /// How long the publisher waits to fill a lot after its first order; a few ms trade latency
    /// for throughput. The broker's cost is mostly per record and per request, so fuller lots
    /// cost it less per order (docs/performance.md, "Orders in lots"). Part of
    /// `message_timeout_ms`, not added to it.
    pub linger_ms: u64,
    /// The most orders in one record (a lot). 1 writes every order as a record of its own, the
    /// only shape an order-service from before lots reads: keep 1 until no such pod is left
    /// (docs/decisions.md).
    pub lot_max_orders: usize,
    /// Upper bound on orders waiting for the broker's ack; one more is refused at once (503).
    pub max_buffered_messages: u64,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: "flash-sale-order-topic".into(),
            group_id: "order-service".into(),
            message_timeout_ms: 5000,
            linger_ms: 10,
            lot_max_orders: 256,
            max_buffered_messages: 100_000,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

/// Logging and metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TelemetrySettings {
    /// `json` in pods, `pretty` on a terminal.
    pub log_format: LogFormat,
    /// Default tracing filter when `RUST_LOG` is not set.
    pub log_level: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: "info".into(),
        }
    }
}

#[cfg(test)]
// figment::Jail's closures must return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    struct Demo {
        server: ListenerSettings,
        redis: RedisSettings,
        database: DatabaseSettings,
    }

    fn defaults() -> Demo {
        Demo {
            server: ListenerSettings::new(8082),
            redis: RedisSettings::default(),
            database: DatabaseSettings::default(),
        }
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "app.toml",
                "[server]\nport = 9000\n[redis]\nurl = \"redis://file:6379\"\n",
            )?;
            jail.set_env(CONFIG_FILE_ENV, "app.toml");
            jail.set_env("FLASH_SALE_REDIS__URL", "redis://env:6379");
            let s = load(defaults()).map_err(|e| e.to_string())?;
            assert_eq!(s.server.port, 9000, "file overrides default");
            assert_eq!(s.server.host, "0.0.0.0", "untouched default stays");
            assert_eq!(
                s.redis.url.expose(),
                "redis://env:6379",
                "env overrides file"
            );
            Ok(())
        });
    }

    #[test]
    fn a_bad_value_is_a_clear_error() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FLASH_SALE_SERVER__PORT", "not-a-port");
            let err = load(defaults()).unwrap_err().to_string();
            assert!(err.contains("port"), "error names the field: {err}");
            Ok(())
        });
    }

    #[test]
    fn secrets_never_print() {
        let mut s = defaults();
        s.database.url = Secret::new("mysql://root:hunter2@db/flash_sale");
        s.redis.url = Secret::new("redis://:swordfish@redis-cluster:6379");
        let printed = format!("{s:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("swordfish"), "{printed}");
        assert!(printed.contains("<redacted>"));
    }
}
