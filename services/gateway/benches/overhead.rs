//! The gateway's own cost, measured (a benchmark, not a test: `cargo bench -p gateway --bench
//! overhead`). Everything runs in this process on loopback, like the seed's co-located `hey`.
//!
//! 1. Buy requests straight at a stand-in for order-service (an axum handler answering 202)
//!    and the same load through the gateway (JWT check, every flow rule on with limits out of
//!    reach, breakers, keep-alive pool): the ratio is the share of throughput the gateway keeps.
//! 2. Refusals of a sold-out activity: a bare axum handler answering `409 SOLD_OUT`, against the
//!    gateway answering from its short circuit.
//!
//! The stand-in does no work, so the gateway's share of the CPU is as large as it can be here;
//! in front of the real order-service (Redis and Kafka per order) the ratio is higher.
//! Settings: `BENCH_SECONDS` per run (default 5), split into `BENCH_ROUNDS` turns (default 5)
//! taken in turn by the runs; `BENCH_CONNECTIONS` (default 64); `BENCH_ONLY=gateway,short`
//! picks runs (`direct`, `hop`, `routing`, `gateway`, `bare`, `short`), for a profiler.

#[path = "support/bare_proxy.rs"]
mod bare_proxy;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::http::{Request, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use flash_sale_common::api;
use flash_sale_common::configuration::{ListenerSettings, Secret};
use flash_sale_common::error::{ApiError, ErrorCode};
use gateway::rules::{FlowRule, Grade, Rules};
use gateway::{Application, Settings};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The allocator the gateway binary runs on (`src/main.rs`), so the gateway measured here costs
/// what it costs in service.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &str = "bench-secret-bench-secret-bench-secret";
const CREATE: &str = api::order::CREATE;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds = Duration::from_secs(env("BENCH_SECONDS", 5));
    let connections = env("BENCH_CONNECTIONS", 64) as usize;

    let accepting = serve(Router::new().route(
        CREATE,
        post(|| async {
            (
                StatusCode::ACCEPTED,
                axum::Json(
                    json!({"orderNo": "1-0197f2a3c4d5e6f708192a3b4c5d6e7f", "status": "PENDING"}),
                ),
            )
        }),
    ))
    .await?;
    let sold_out = serve(Router::new().route(
        CREATE,
        post(|| async {
            ApiError::new(ErrorCode::SoldOut, "this activity is sold out").into_response()
        }),
    ))
    .await?;

    let bare_proxy = bare_proxy(&accepting).await?;
    let rule_files = tempfile::tempdir()?;
    // No Redis: its URL is a port this process holds without listening, so every connection
    // attempt is refused at once and nobody else's port is touched.
    let no_redis = tokio::net::TcpSocket::new_v4()?;
    no_redis.bind("127.0.0.1:0".parse()?)?;
    let redis_url = format!("redis://{}", no_redis.local_addr()?);
    let dir = rule_files.path();
    let routing_only = gateway(&accepting, false, dir, &redis_url).await?;
    let through_accepting = gateway(&accepting, true, dir, &redis_url).await?;
    let through_sold_out = gateway(&sold_out, true, dir, &redis_url).await?;
    let tokens: Arc<Vec<String>> = Arc::new((1..=1000).map(token).collect());

    println!(
        "gateway overhead: {connections} connections, {} s per run",
        seconds.as_secs()
    );
    let runs = [
        (
            "direct",
            "buy, straight at the stand-in",
            &accepting,
            StatusCode::ACCEPTED,
        ),
        (
            "hop",
            "buy, through a bare hyper proxy (no checks)",
            &bare_proxy,
            StatusCode::ACCEPTED,
        ),
        (
            "routing",
            "buy, through the gateway, routing only (no token check, no rules)",
            &routing_only,
            StatusCode::ACCEPTED,
        ),
        (
            "gateway",
            "buy, through the gateway",
            &through_accepting,
            StatusCode::ACCEPTED,
        ),
        (
            "bare",
            "sold out, bare axum handler",
            &sold_out,
            StatusCode::CONFLICT,
        ),
        (
            "short",
            "sold out, gateway short circuit",
            &through_sold_out,
            StatusCode::CONFLICT,
        ),
    ];
    // BENCH_ONLY=gateway,short runs only those (for a profiler).
    let only = std::env::var("BENCH_ONLY").ok();
    let runs: Vec<_> = runs
        .into_iter()
        .filter(|(key, ..)| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|k| k == *key))
        })
        .collect();
    // The runs take turns in short rounds, so a neighbour's burst of CPU use on a shared
    // machine falls on all of them rather than on one.
    let rounds = env("BENCH_ROUNDS", 5).max(1) as u32;
    let mut totals = vec![(0u64, Duration::ZERO, 0u64); runs.len()];
    for _ in 0..rounds {
        for (i, (_, _, base, expected)) in runs.iter().enumerate() {
            let report = load(
                base,
                CREATE,
                &tokens,
                connections,
                seconds / rounds,
                *expected,
            )
            .await;
            totals[i].0 += report.done;
            totals[i].1 += report.elapsed;
            totals[i].2 += report.unexpected;
        }
    }
    let mut rates = std::collections::HashMap::new();
    println!();
    println!("| run | requests/s | unexpected answers |");
    println!("|---|---|---|");
    for ((key, name, ..), (done, elapsed, unexpected)) in runs.iter().zip(&totals) {
        let rate = *done as f64 / elapsed.as_secs_f64();
        println!("| {name} | {rate:.0} | {unexpected} |");
        rates.insert(*key, rate);
    }
    println!();
    for (what, a, b, aim) in [
        (
            "through the gateway / straight",
            "gateway",
            "direct",
            " (a stand-in that does no work; the aim of 0.70 is for `cargo xtask bench`)",
        ),
        ("routing only / straight", "routing", "direct", ""),
        (
            "bare hyper proxy / straight (the extra hop alone)",
            "hop",
            "direct",
            "",
        ),
        (
            "sold-out short circuit / bare handler",
            "short",
            "bare",
            " (aim >= 0.50)",
        ),
    ] {
        if let (Some(a), Some(b)) = (rates.get(a), rates.get(b)) {
            println!("{what}: {:.2}{aim}", a / b);
        }
    }
    Ok(())
}

async fn serve(app: Router) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// [`bare_proxy::router`] in front of `upstream`.
async fn bare_proxy(upstream: &str) -> anyhow::Result<String> {
    serve(bare_proxy::router(upstream.parse()?)).await
}

/// A gateway in front of `upstream`: with `checks`, the token check and every rule type on,
/// limits out of reach, no Redis at `redis_url` (the cluster bucket costs one Redis call, not
/// measured here); without, routing alone (no token check, no rules).
async fn gateway(
    upstream: &str,
    checks: bool,
    dir: &std::path::Path,
    redis_url: &str,
) -> anyhow::Result<String> {
    let mut settings = Settings::default();
    settings.server = ListenerSettings {
        host: "127.0.0.1".into(),
        port: 0,
    };
    settings.management = settings.server.clone();
    settings.auth.hs256_secret = Secret::new(SECRET);
    settings.admission.secret = Secret::new("gateway-test-admission-secret-of-32-bytes");
    settings.upstreams.order_service = upstream.to_owned();
    settings.redis.url = Secret::new(redis_url);
    let file = dir.join(format!(
        "rules-{}-{checks}.toml",
        upstream.replace([':', '/', '.'], "-")
    ));
    let mut rules = Rules::default();
    rules.cluster.clear();
    rules.flow = vec![
        FlowRule::qps("flash-sale-order", 1e9),
        FlowRule {
            grade: Grade::Concurrency,
            ..FlowRule::qps("flash-sale-order", 1e6)
        },
        FlowRule::qps("activity:1", 1e9),
    ];
    rules.param[0].count = 1_000_000;
    if !checks {
        settings.routes.flash_sale.authenticate = false;
        rules = Rules {
            flow: vec![],
            param: vec![],
            cluster: vec![],
            breaker: vec![],
            ..Rules::default()
        };
        rules.system.adaptive = false;
        rules.sold_out.enabled = false;
    }
    std::fs::write(&file, toml::to_string(&rules)?)?;
    settings.rules.file = Some(file.to_string_lossy().into_owned());
    let app = Application::build(settings).await?;
    let url = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped(CancellationToken::new()));
    Ok(url)
}

fn token(user: i64) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user.to_string(), "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

struct Report {
    done: u64,
    elapsed: Duration,
    unexpected: u64,
}

/// `connections` workers sending one request after the other for `duration`.
async fn load(
    base: &str,
    path: &str,
    tokens: &Arc<Vec<String>>,
    connections: usize,
    duration: Duration,
    expected: StatusCode,
) -> Report {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .build_http();
    let url: axum::http::Uri = format!("{base}{path}").parse().unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let unexpected = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + duration;
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..connections {
        let (client, url, tokens) = (client.clone(), url.clone(), tokens.clone());
        let (done, unexpected) = (done.clone(), unexpected.clone());
        workers.push(tokio::spawn(async move {
            let mut i = worker;
            while Instant::now() < stop {
                i = (i + connections) % tokens.len();
                let user = i + 1;
                let body = format!(r#"{{"userId":"{user}","activityId":"1","quantity":1}}"#);
                let request = Request::post(url.clone())
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::AUTHORIZATION, format!("Bearer {}", tokens[i]))
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                match client.request(request).await {
                    Ok(response) => {
                        let status = response.status();
                        let _ = response.into_body().collect().await;
                        if status == expected {
                            done.fetch_add(1, Ordering::Relaxed);
                        } else {
                            unexpected.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        unexpected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for worker in workers {
        let _ = worker.await;
    }
    Report {
        done: done.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        unexpected: unexpected.load(Ordering::Relaxed),
    }
}
