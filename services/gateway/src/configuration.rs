//! gateway settings: what is fixed for the life of the process (listeners, upstreams, timeouts,
//! identity, Redis). The flow rules, which change while it runs, live in the rule file
//! ([`crate::rules`]), named here by `rules.file`.

use flash_sale_common::configuration::{
    ListenerSettings, RedisSettings, Secret, TelemetrySettings,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// The traffic listener (seed: 8080).
    pub server: ListenerSettings,
    /// `/health/*` and `/metrics` (seed: 8081).
    pub management: ListenerSettings,
    /// Where order-service and inventory-service listen, and the connection pool to them.
    pub upstreams: UpstreamSettings,
    /// Per-route timeouts and whether the route needs a user token.
    pub routes: RoutesSettings,
    /// Body limit, client address, resource bounds.
    pub proxy: ProxySettings,
    /// Client connections: caps and the deadline of each phase ([`crate::edge`]).
    pub connections: ConnectionSettings,
    /// How the user token is verified.
    pub auth: AuthSettings,
    /// The key of queue tickets and purchase passes (docs/waiting-room.md).
    pub admission: AdmissionSettings,
    /// The Redis that holds the cluster-wide token buckets. Its timeouts are short: a slow Redis
    /// must cost a request at most a few milliseconds before the local share decides instead.
    pub redis: RedisSettings,
    /// The cluster bucket's replica counting and Redis retry.
    pub cluster: ClusterSettings,
    /// Where the flow rules come from and how often the file is checked.
    pub rules: RulesSettings,
    /// Log format and level.
    pub telemetry: TelemetrySettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ListenerSettings::new(8080),
            management: ListenerSettings::new(8081),
            upstreams: UpstreamSettings::default(),
            routes: RoutesSettings::default(),
            proxy: ProxySettings::default(),
            connections: ConnectionSettings::default(),
            auth: AuthSettings::default(),
            admission: AdmissionSettings::default(),
            // The waiting room's and the passes' calls, and the connection's own timeout; the
            // cluster bucket's calls have shorter limits (`cluster.bucket_*`).
            redis: RedisSettings {
                max_in_flight: 2048,
                acquire_timeout_ms: 250,
                response_timeout_ms: 1000,
                ..RedisSettings::default()
            },
            cluster: ClusterSettings::default(),
            rules: RulesSettings::default(),
            telemetry: TelemetrySettings::default(),
        }
    }
}

/// Where the downstream services listen (`FLASH_SALE_UPSTREAMS__ORDER_SERVICE`, ...).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamSettings {
    /// Base URL of order-service (`http://host:port`); `/api/flash-sale/**` goes there.
    pub order_service: String,
    /// Base URL of inventory-service; `/api/inventory/**` goes there.
    pub inventory_service: String,
    /// Idle keep-alive connections kept per upstream host. The proxy reuses them instead of
    /// paying a TCP handshake per request; under the seed's 1000-connection load most are busy.
    pub pool_max_idle_per_host: usize,
    /// How long an idle pooled connection is kept before it is closed.
    pub pool_idle_timeout_ms: u64,
    /// How long opening a new connection may take; an upstream that is down answers at once
    /// (connection refused), one that is unreachable would otherwise hold the request.
    pub connect_timeout_ms: u64,
    /// The longest answer body passed on. The gateway reads an answer whole before passing it
    /// on (the services answer small JSON documents); a longer one is refused
    /// `503 SERVICE_UNAVAILABLE` and logged.
    pub max_response_bytes: usize,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            order_service: "http://127.0.0.1:8082".into(),
            inventory_service: "http://127.0.0.1:8084".into(),
            pool_max_idle_per_host: 1024,
            pool_idle_timeout_ms: 90_000,
            connect_timeout_ms: 1000,
            max_response_bytes: 1024 * 1024,
        }
    }
}

/// Per-route settings that do not change while the gateway runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutesSettings {
    /// `/api/flash-sale/**` (route id `flash-sale-order`, the seed's).
    pub flash_sale: RouteSettings,
    /// `/api/inventory/**` (route id `inventory`).
    pub inventory: RouteSettings,
}

impl Default for RoutesSettings {
    fn default() -> Self {
        Self {
            // Longer than order-service's own worst case (Kafka publish 5 s), so the buyer hears
            // order-service's answer rather than a gateway timeout while the order may succeed.
            flash_sale: RouteSettings {
                timeout_ms: 6000,
                authenticate: true,
            },
            // Warm-up and reconcile calls of the admin API may take a while.
            inventory: RouteSettings {
                timeout_ms: 10_000,
                authenticate: false,
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteSettings {
    /// Time from sending the request to the upstream's response head; past it the gateway
    /// answers 504 `UPSTREAM_TIMEOUT` and counts an error for the circuit breaker.
    pub timeout_ms: u64,
    /// Whether the route needs the user token. The inventory admin API authenticates its own
    /// bearer token, so the gateway passes `Authorization` through untouched there.
    pub authenticate: bool,
}

/// Request handling.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxySettings {
    /// Largest request body accepted, in bytes; bigger ones get 413 `PAYLOAD_TOO_LARGE` without
    /// reaching an upstream. The API's bodies are small JSON documents.
    pub body_limit_bytes: usize,
    /// How many proxies in front of the gateway append to `X-Forwarded-For`. 0: the client is
    /// the TCP peer. 1 (behind the ingress controller): the last entry of the header. Entries a
    /// client wrote itself are never trusted, so the per-IP limit cannot be dodged by forging it.
    pub trusted_proxy_hops: usize,
    /// Most activities that get their own `activity:N` resource (and metric labels); further
    /// ones share `activity:other`, so a client inventing ids cannot blow up the label set.
    pub max_tracked_activities: usize,
    /// How often the gateway samples its own CPU usage for the system rule's CPU checks.
    pub cpu_sample_interval_ms: u64,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            body_limit_bytes: 16 * 1024,
            trusted_proxy_hops: 0,
            max_tracked_activities: 1000,
            cpu_sample_interval_ms: 1000,
        }
    }
}

/// Client connections (docs/gateway.md, "Hostile clients").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionSettings {
    /// From a request's first byte to its complete head (request line and headers). A phone on
    /// a bad network sends a head of a few hundred bytes in one or two round trips; a
    /// slowloris trickles it over minutes.
    pub head_timeout_ms: u64,
    /// For the handler to read the whole body (at most `proxy.body_limit_bytes`); 408 past it.
    pub body_timeout_ms: u64,
    /// A kept-alive connection with no request is closed after this. Longer than the ingress'
    /// upstream keep-alive, so the ingress closes first and never reuses a closing connection.
    pub idle_timeout_ms: u64,
    /// Most client connections open at once; 0: the open-file limit minus
    /// [`FILE_RESERVE`]. A value that leaves less than that reserve is refused at start.
    pub max_connections: usize,
    /// Most connections open at once from one peer address (behind the ingress, the peer is
    /// the ingress controller: size it for that, the ingress caps each client); 0: no cap.
    pub max_connections_per_ip: u32,
    /// Most requests in flight at once from one client behind `proxy.trusted_proxy_hops`
    /// proxies (the address the outermost trusted proxy saw); past it `429 RATE_LIMITED` and
    /// the connection, the proxy's and shared by other clients, stays open. 0: no cap. Without
    /// trusted proxies it is not used: the client is the peer, and one HTTP/1 connection has
    /// one request in flight, so `max_connections_per_ip` bounds it.
    pub max_requests_per_client: u32,
    /// Most header fields in a request; more is 431.
    pub max_headers: usize,
    /// Largest request head in bytes; larger is 431.
    pub max_head_bytes: usize,
}

/// File descriptors kept for what is not a client connection (upstream and Redis connections,
/// the management listener, the rule file, logs): this many, or a quarter of the limit if that
/// is less.
pub const FILE_RESERVE: u64 = 1024;

impl Default for ConnectionSettings {
    fn default() -> Self {
        Self {
            head_timeout_ms: 10_000,
            body_timeout_ms: 10_000,
            idle_timeout_ms: 75_000,
            max_connections: 0,
            max_connections_per_ip: 512,
            max_requests_per_client: 64,
            max_headers: 64,
            max_head_bytes: 16 * 1024,
        }
    }
}

impl ConnectionSettings {
    /// Raises this process's open-file soft limit to its hard limit (as nginx and Go's runtime
    /// do) and returns the global cap: `max_connections`, or with 0 the limit minus the reserve.
    /// A cap that leaves less than the reserve is refused.
    pub fn check_file_limit(&self) -> anyhow::Result<usize> {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let mut rlimit = getrlimit(Resource::Nofile);
        if rlimit.maximum > rlimit.current {
            rlimit.current = rlimit.maximum;
            if let Err(error) = setrlimit(Resource::Nofile, rlimit) {
                tracing::warn!(%error, "could not raise the open-file soft limit to the hard limit");
            }
        }
        let limit = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        self.cap_for(limit)
    }

    /// The global cap under an open-file limit of `limit`.
    pub fn cap_for(&self, limit: u64) -> anyhow::Result<usize> {
        let reserve = FILE_RESERVE.min(limit / 4);
        let room = limit.saturating_sub(reserve);
        match self.max_connections {
            _ if room == 0 => anyhow::bail!(
                "the open-file limit is {limit}: no room for client connections (raise it: ulimit -n)"
            ),
            0 => Ok(usize::try_from(room).unwrap_or(usize::MAX)),
            n if n as u64 <= room => Ok(n),
            n => anyhow::bail!(
                "connections.max_connections is {n}, but the open-file limit of {limit} leaves room for {room} (the gateway keeps {reserve} for its own files): lower it or raise the limit"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_stays_below_the_file_limit() {
        let auto = ConnectionSettings::default();
        assert_eq!(auto.cap_for(20_000).unwrap(), 20_000 - 1024);
        assert_eq!(
            auto.cap_for(1024).unwrap(),
            768,
            "a small limit keeps a quarter"
        );
        assert!(auto.cap_for(0).is_err());
        let fixed = |n| ConnectionSettings {
            max_connections: n,
            ..ConnectionSettings::default()
        };
        assert_eq!(fixed(5000).cap_for(20_000).unwrap(), 5000);
        assert_eq!(fixed(18_976).cap_for(20_000).unwrap(), 18_976);
        let error = fixed(18_977).cap_for(20_000).unwrap_err().to_string();
        assert!(error.contains("leaves room for 18976"), "{error}");
    }
}

/// Signature algorithm of the user token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret (`auth.hs256_secret`).
    HS256,
    /// RSA PKCS#1 v1.5 with SHA-256; the gateway holds only the public key (`auth.rs256_public_key`).
    RS256,
}

/// Queue tickets and purchase passes are signed by the gateway (HS256).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AdmissionSettings {
    /// At least 32 bytes, the same on every replica (`FLASH_SALE_ADMISSION__SECRET`, from a
    /// Secret). Empty is allowed in development mode only: a random secret of the process then
    /// signs, and tickets do not outlive it.
    pub secret: Secret,
}

/// Who the buyer is: a signed token (JWT) in `Authorization: Bearer ...`; its `sub` claim is the
/// user id passed downstream in `x-user-id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthSettings {
    /// HS256 or RS256; a token signed any other way is refused (no `alg` confusion).
    pub algorithm: JwtAlgorithm,
    /// The HS256 shared secret (at least 32 bytes).
    pub hs256_secret: Secret,
    /// The RS256 public key, PEM (`BEGIN PUBLIC KEY` or `BEGIN RSA PUBLIC KEY`).
    pub rs256_public_key: String,
    /// Required `iss` claim, if set.
    pub issuer: Option<String>,
    /// Required `aud` claim, if set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Development only: let requests without a token through (with no `x-user-id`), so
    /// order-service takes the `userId` of the body and the seed's `hey` command works as written.
    /// A token that is presented is still verified. Off by default; never on in production.
    pub trust_body_user_id: bool,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            algorithm: JwtAlgorithm::HS256,
            hs256_secret: Secret::default(),
            rs256_public_key: String::new(),
            issuer: None,
            audience: None,
            leeway_secs: 5,
            trust_body_user_id: false,
        }
    }
}

/// The cluster-wide token bucket's Redis side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// How many gateway replicas to assume before Redis has told how many are alive (the
    /// HPA's minimum). When Redis is unreachable, each replica enforces rate / replicas.
    pub replicas_hint: usize,
    /// How often each replica registers itself in Redis, so the others can count the replicas
    /// alive; one that misses three beats is no longer counted.
    pub heartbeat_ms: u64,
    /// After a failed Redis call, how long the local share decides before Redis is tried again,
    /// so a dead Redis costs one timeout per interval rather than one per request.
    pub retry_ms: u64,
    /// How long a bucket call waits for one of `redis.max_in_flight` slots. The bucket's calls
    /// are short-fused: a late answer only means the local share decides that request.
    pub bucket_acquire_timeout_ms: u64,
    /// Timeout of one bucket call or heartbeat (at most `redis.response_timeout_ms`).
    pub bucket_response_timeout_ms: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            replicas_hint: 3,
            heartbeat_ms: 1000,
            retry_ms: 1000,
            bucket_acquire_timeout_ms: 10,
            bucket_response_timeout_ms: 100,
        }
    }
}

/// The rule file (flow, hot-parameter, system, cluster, breaker and sold-out rules).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RulesSettings {
    /// Path of the TOML rule file (in Kubernetes, a mounted ConfigMap). None: the built-in
    /// rules (the seed's numbers), which `rules.example.toml` spells out.
    pub file: Option<String>,
    /// How often the file's modification time is checked; a changed file is reloaded.
    pub poll_interval_ms: u64,
}

impl Default for RulesSettings {
    fn default() -> Self {
        Self {
            file: None,
            poll_interval_ms: 1000,
        }
    }
}
