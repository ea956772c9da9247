//! Test support: tokens, small upstream apps standing in for order-service and
//! inventory-service, and a gateway on port 0. (The tests that need a real Redis live in
//! `flash-sale-tests`, whose stack starts one: tests/integration/tests/gateway_cluster.rs.)
//!
//! The RSA keys (`keys.rs`) were generated for these tests with openssl and protect nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::serve::ListenerExt;
use flash_sale_common::api;
use flash_sale_common::configuration::{ListenerSettings, Secret};
use flash_sale_common::error::{ApiError, ErrorCode};
use gateway::rules::Rules;
use gateway::{Application, Settings};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub(crate) const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";
pub(crate) use crate::keys::{RS256_OTHER_PRIVATE, RS256_PRIVATE, RS256_PUBLIC};
pub(crate) const CREATE: &str = api::order::CREATE;

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token for `user`, valid for an hour.
pub(crate) fn token(user: i64) -> String {
    hs256(
        json!({"sub": user.to_string(), "exp": now_secs() + 3600}),
        SECRET,
    )
}

pub(crate) fn hs256(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub(crate) fn rs256(claims: Value, private_pem: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A loopback address this test binary holds without listening on it: a connection to it is
/// refused at once, and no other process can take the port meanwhile (a fixed "closed" port
/// such as 9 may be someone's).
pub(crate) fn refusing_address() -> SocketAddr {
    static HELD: LazyLock<(tokio::net::TcpSocket, SocketAddr)> = LazyLock::new(|| {
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket
            .bind("127.0.0.1:0".parse().expect("a loopback address"))
            .expect("binding a loopback port");
        let address = socket.local_addr().expect("the bound address");
        (socket, address)
    });
    HELD.1
}

/// Gateway settings for tests: loopback, port 0, HS256 with [`SECRET`], upstreams and Redis
/// unset (pointing at [`refusing_address`]).
pub(crate) fn settings() -> Settings {
    let mut s = Settings::default();
    s.server = ListenerSettings {
        host: "127.0.0.1".into(),
        port: 0,
    };
    s.management = s.server.clone();
    s.auth.hs256_secret = Secret::new(SECRET);
    s.admission.secret = Secret::new("gateway-test-admission-secret-of-32-bytes");
    let nowhere = refusing_address();
    s.upstreams.order_service = format!("http://{nowhere}");
    s.upstreams.inventory_service = format!("http://{nowhere}");
    s.redis.url = Secret::new(format!("redis://{nowhere}"));
    s.cluster.retry_ms = 100;
    s
}

/// Rules with nothing on: each test turns on what it checks.
pub(crate) fn no_rules() -> Rules {
    Rules {
        flow: vec![],
        param: vec![],
        system: gateway::rules::SystemRule {
            adaptive: false,
            ..Default::default()
        },
        cluster: vec![],
        breaker: vec![],
        sold_out: gateway::rules::SoldOutRule {
            enabled: false,
            ttl_ms: 1000,
        },
        admission: Default::default(),
        waiting_room: vec![],
    }
}

/// What a test upstream answers to the order creation path.
#[derive(Debug, Clone)]
pub(crate) enum Behavior {
    /// 202 with the headers it received, echoed.
    Echo,
    /// 409 SOLD_OUT, as order-service answers when no stock is left.
    SoldOut,
    /// A 500.
    Fail,
    /// Waits, then echoes.
    Slow(Duration),
    /// 200 with a body of this many bytes.
    Large(usize),
    /// Echoes, and closes the connection after the answer (`Connection: close`).
    CloseAfter,
}

#[derive(Clone)]
struct UpstreamState {
    behavior: Arc<Mutex<Behavior>>,
    hits: Arc<AtomicU64>,
}

/// A stand-in for order-service and inventory-service: counts the requests it gets and echoes
/// what it received (method, path, headers, body) as JSON.
pub(crate) struct TestUpstream {
    pub(crate) addr: SocketAddr,
    behavior: Arc<Mutex<Behavior>>,
    hits: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestUpstream {
    pub(crate) async fn start() -> Self {
        Self::start_on(
            0,
            Arc::new(Mutex::new(Behavior::Echo)),
            Arc::new(AtomicU64::new(0)),
        )
        .await
    }

    async fn start_on(port: u16, behavior: Arc<Mutex<Behavior>>, hits: Arc<AtomicU64>) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .fallback(any(upstream_handler))
            .with_state(UpstreamState {
                behavior: behavior.clone(),
                hits: hits.clone(),
            });
        let connections = Arc::new(AtomicU64::new(0));
        let accepted = connections.clone();
        let listener = listener.tap_io(move |_| {
            accepted.fetch_add(1, Ordering::SeqCst);
        });
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .unwrap();
        });
        Self {
            addr,
            behavior,
            hits,
            connections,
            stop,
            task: Some(task),
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn set(&self, behavior: Behavior) {
        *self.behavior.lock().unwrap() = behavior;
    }

    pub(crate) fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// TCP connections accepted since (re)start.
    pub(crate) fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Stops listening and closes its connections.
    pub(crate) async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Listens again on the same port.
    pub(crate) async fn restart(&mut self) {
        let again =
            Self::start_on(self.addr.port(), self.behavior.clone(), self.hits.clone()).await;
        *self = again;
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn upstream_handler(State(state): State<UpstreamState>, request: Request) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let behavior = state.behavior.lock().unwrap().clone();
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let is_create = parts.uri.path() == CREATE;
    match behavior {
        Behavior::SoldOut if is_create => {
            return ApiError::new(ErrorCode::SoldOut, "this activity is sold out").into_response();
        }
        Behavior::Fail => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Behavior::Slow(delay) => tokio::time::sleep(delay).await,
        Behavior::Large(len) => return vec![b'x'; len].into_response(),
        _ => {}
    }
    let status = if is_create {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let mut response = (
        status,
        axum::Json(echo(
            &parts.method,
            parts.uri.to_string(),
            &parts.headers,
            &body,
        )),
    )
        .into_response();
    if matches!(behavior, Behavior::CloseAfter) {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

fn echo(method: &axum::http::Method, uri: String, headers: &HeaderMap, body: &Bytes) -> Value {
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("?").to_owned()))
        .collect();
    json!({
        "method": method.as_str(),
        "uri": uri,
        "headers": headers,
        "body": String::from_utf8_lossy(body),
    })
}

/// A gateway running on port 0.
pub(crate) struct TestGateway {
    pub(crate) address: String,
    pub(crate) management: String,
    pub(crate) state: gateway::state::AppState,
    stop: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestGateway {
    pub(crate) async fn spawn(settings: Settings) -> Self {
        let app = Application::build(settings)
            .await
            .expect("the gateway builds");
        let address = format!("http://127.0.0.1:{}", app.port());
        let management = format!("http://127.0.0.1:{}", app.management_port());
        let state = app.state().clone();
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(stop.clone()));
        Self {
            address,
            management,
            state,
            stop,
            task: Some(task),
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub(crate) async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.management))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Sends an order creation through the gateway with `user`'s token.
pub(crate) async fn buy(
    client: &reqwest::Client,
    gateway: &TestGateway,
    user: i64,
    activity: i64,
) -> reqwest::Response {
    client
        .post(gateway.url(CREATE))
        .bearer_auth(token(user))
        .json(
            &json!({"userId": user.to_string(), "activityId": activity.to_string(), "quantity": 1}),
        )
        .send()
        .await
        .unwrap()
}

/// The value of one sample line of `/metrics`, e.g. `gateway_circuit_state{downstream="order-service"}`.
pub(crate) fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

/// Polls `check` until it holds or `timeout` passes.
pub(crate) async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes a rule file.
pub(crate) fn write_rules(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}
