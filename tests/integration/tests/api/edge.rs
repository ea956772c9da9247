//! The gateway binary under hostile clients, over raw TCP: slow heads, slow bodies, idle
//! keep-alive, connection caps, malformed and smuggling requests, pipelining. Behind it are two
//! recording upstreams (one per route), so a test sees exactly what was forwarded, and where.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{Method, Uri};
use flash_sale_tests::apps::gateway_settings;
use flash_sale_tests::stack::Stack;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::helpers::{ServiceProcess, ServiceSettings};

/// What an upstream received: method, path and query, body.
type Log = Arc<Mutex<Vec<(String, String, String)>>>;

/// A recording upstream on a free port: answers 200 `ok` to anything.
async fn upstream() -> (String, Log) {
    let log: Log = Arc::default();
    let recorded = log.clone();
    let app = Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
        let log = recorded.clone();
        async move {
            log.lock().unwrap().push((
                method.to_string(),
                uri.to_string(),
                String::from_utf8_lossy(&body).into_owned(),
            ));
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, log)
}

struct Edge {
    gateway: ServiceProcess,
    address: SocketAddr,
    order: Log,
    inventory: Log,
    _stack: Stack,
}

/// The gateway in development mode with short deadlines, in its own process.
async fn edge(configure: impl FnOnce(&mut gateway::Settings)) -> Edge {
    let stack = Stack::start_redis_only().unwrap();
    let (order_url, order) = upstream().await;
    let (inventory_url, inventory) = upstream().await;
    let mut settings = gateway_settings(&stack, &order_url, &inventory_url);
    settings.auth.trust_body_user_id = true;
    settings.connections.head_timeout_ms = 500;
    settings.connections.body_timeout_ms = 500;
    settings.connections.idle_timeout_ms = 800;
    configure(&mut settings);
    let gateway = ServiceProcess::spawn(ServiceSettings::Gateway(settings))
        .await
        .unwrap();
    let address = gateway
        .base_url
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    Edge {
        gateway,
        address,
        order,
        inventory,
        _stack: stack,
    }
}

/// Connects from `from` (a loopback address) to the gateway.
async fn connect_from(to: SocketAddr, from: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads until the peer closes or `wait` passes. Returns what came and whether it closed.
async fn read_all(stream: &mut TcpStream, wait: Duration) -> (String, bool) {
    let mut text = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&text).into(), true),
            Ok(Ok(n)) => text.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&text).into(), false),
        }
    }
}

/// Sends `request` on a new connection and reads until the gateway closes it (at most 3 s).
async fn exchange(address: SocketAddr, request: &[u8]) -> (String, bool) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_all(&mut stream, Duration::from_secs(3)).await
}

/// How many responses `text` holds (bodies here never contain a status line).
fn responses(text: &str) -> usize {
    text.matches("HTTP/1.1 ").count()
}

async fn counter(edge: &Edge, series: &str) -> f64 {
    let http = flash_sale_tests::apps::http_client();
    let text = edge.gateway.metrics(&http).await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

const GET: &[u8] =
    b"GET /api/flash-sale/order/1-0123456789abcdef0123456789abcdef HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn slow_heads_slow_bodies_and_idle_connections_are_closed_and_counted() {
    let edge = edge(|_| {}).await;

    // a slowloris: two lines of a head, then nothing
    let started = Instant::now();
    let mut slow = TcpStream::connect(edge.address).await.unwrap();
    slow.write_all(b"POST /api/flash-sale/order/create HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (text, closed) = read_all(&mut slow, Duration::from_secs(3)).await;
    assert!(closed, "a head that never ends is closed: {text:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "not before its deadline"
    );

    // a phone on a bad network: the head in three pieces within the deadline is answered
    let mut phone = TcpStream::connect(edge.address).await.unwrap();
    for piece in GET.chunks(GET.len() / 3 + 1) {
        phone.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    let mut buf = [0u8; 1024];
    let n = phone.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // then kept alive and idle: closed after the idle deadline
    let idle_started = Instant::now();
    let (_, closed) = read_all(&mut phone, Duration::from_secs(3)).await;
    assert!(closed, "an idle connection is closed");
    // (the idle deadline counts from the answer, which came before this read)
    assert!(idle_started.elapsed() >= Duration::from_millis(500));

    // a body that stops halfway: 408, and the connection closes
    let (text, closed) = exchange(
        edge.address,
        b"POST /api/flash-sale/order/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n{\"userId\":",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("REQUEST_TIMEOUT"), "{text}");
    assert!(closed);

    assert_eq!(
        edge.order.lock().unwrap().len(),
        1,
        "only the phone's request went through"
    );
    for phase in ["head", "idle", "body"] {
        let n = counter(
            &edge,
            &format!("gateway_connection_timeouts_total{{phase=\"{phase}\"}}"),
        )
        .await;
        assert!(n >= 1.0, "{phase}: {n}");
    }
}

#[tokio::test]
async fn past_a_cap_a_connection_is_closed_at_once_and_others_still_connect() {
    let edge = edge(|s| {
        s.connections.max_connections_per_ip = 8;
        s.connections.idle_timeout_ms = 20_000;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from(edge.address, "127.0.0.1").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let mut ninth = connect_from(edge.address, "127.0.0.1").await;
    let (_, closed) = read_all(&mut ninth, Duration::from_secs(2)).await;
    assert!(
        closed && started.elapsed() < Duration::from_secs(1),
        "the ninth is closed at once"
    );
    // another address is not locked out, and is served
    let mut other = connect_from(edge.address, "127.0.0.2").await;
    other.write_all(GET).await.unwrap();
    let mut buf = [0u8; 256];
    let n = other.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert!(
        counter(
            &edge,
            "gateway_connections_refused_total{reason=\"ip_cap\"}"
        )
        .await
            >= 1.0
    );
    // the first address gets its place back once one of its connections closes
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from(edge.address, "127.0.0.1").await;
    again.write_all(GET).await.unwrap();
    let n = again.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    let global = self::edge(|s| {
        s.connections.max_connections = 4;
        s.connections.max_connections_per_ip = 0;
        s.connections.idle_timeout_ms = 20_000;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(global.address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fifth = TcpStream::connect(global.address).await.unwrap();
    let (_, closed) = read_all(&mut fifth, Duration::from_secs(2)).await;
    assert!(closed);
    assert!(
        counter(
            &global,
            "gateway_connections_refused_total{reason=\"global_cap\"}"
        )
        .await
            >= 1.0
    );
    assert!(counter(&global, "gateway_connections_open").await >= 4.0);
}

/// A GET from `client` as a proxy one hop in front would send it (the client's own claim left of
/// the proxy's entry).
fn forwarded_get(client: &str) -> Vec<u8> {
    format!(
        "GET /api/flash-sale/order/1-0123456789abcdef0123456789abcdef HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9, {client}\r\n\r\n"
    )
    .into_bytes()
}

/// Reads one response head and body of `Content-Length` bytes, leaving the connection open.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
            .await
            .expect("an answer within 3 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before a whole answer: {:?}",
            String::from_utf8_lossy(&text)
        );
        text.extend_from_slice(&buf[..n]);
        let done = std::str::from_utf8(&text).ok().and_then(|t| {
            let (head, body) = t.split_once("\r\n\r\n")?;
            let length: usize = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })?;
            (body.len() >= length).then_some(())
        });
        if done.is_some() {
            return String::from_utf8(text).unwrap();
        }
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_a_client_past_its_cap_gets_429_and_the_proxy_stays_connected() {
    let edge = edge(|s| {
        s.proxy.trusted_proxy_hops = 1;
        s.connections.max_requests_per_client = 3;
        s.connections.body_timeout_ms = 10_000;
        s.connections.idle_timeout_ms = 20_000;
    })
    .await;
    // The proxy (127.0.0.1) carries three of 198.51.100.7's requests whose bodies are slow to come.
    let body = br#"{"userId":"1","activityId":1,"quantity":1}"#;
    let (start, rest) = body.split_at(10);
    let head = format!(
        "POST /api/flash-sale/order/create HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.7\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = connect_from(edge.address, "127.0.0.1").await;
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(start).await.unwrap();
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A fourth from the same client, on the proxy's shared connection, whatever it claims left
    // of the proxy's entry: 429, and the connection stays open for the next client's request.
    let mut shared = connect_from(edge.address, "127.0.0.1").await;
    shared
        .write_all(&forwarded_get("198.51.100.7"))
        .await
        .unwrap();
    let refused = read_response(&mut shared).await;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("RATE_LIMITED"), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    shared
        .write_all(&forwarded_get("198.51.100.8"))
        .await
        .unwrap();
    let other = read_response(&mut shared).await;
    assert!(
        other.starts_with("HTTP/1.1 200"),
        "another client is served: {other}"
    );

    // One of the slow bodies completes: forwarded, and the client has a place again.
    let mut first = held.remove(0);
    first.write_all(rest).await.unwrap();
    let answered = read_response(&mut first).await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    shared
        .write_all(&forwarded_get("198.51.100.7"))
        .await
        .unwrap();
    let again = read_response(&mut shared).await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");

    let forwarded = edge.order.lock().unwrap().len();
    assert_eq!(forwarded, 3, "the refused request was never forwarded");
    assert_eq!(
        counter(
            &edge,
            "gateway_connections_refused_total{reason=\"client_cap\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn hostile_requests_get_a_4xx_or_a_closed_connection_and_are_never_forwarded() {
    let edge = edge(|_| {}).await;
    let many_headers: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let big_header = format!("X-Big: {}\r\n", "a".repeat(20_000));
    let long_path = format!("/api/flash-sale/{}", "p".repeat(70_000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "too many headers",
            format!("GET /api/flash-sale/x HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n").into_bytes(),
            "HTTP/1.1 431",
        ),
        (
            "a head too large",
            format!("GET /api/flash-sale/x HTTP/1.1\r\nHost: x\r\n{big_header}\r\n").into_bytes(),
            "HTTP/1.1 431",
        ),
        (
            "a path too long",
            format!("GET {long_path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes(),
            "HTTP/1.1 4",
        ),
        (
            "two different Content-Length",
            b"POST /api/flash-sale/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            "an obs-fold header",
            b"GET /api/flash-sale/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            "an extension method",
            b"FOOBAR /api/flash-sale/x HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "HTTP/1.1 405",
        ),
        (
            "not HTTP",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
    ];
    for (case, request, expected) in cases {
        let (text, closed) = exchange(edge.address, &request).await;
        assert!(text.starts_with(expected), "{case}: {text:?}");
        assert!(closed, "{case}: the connection is closed after the refusal");
    }
    assert!(
        edge.order.lock().unwrap().is_empty(),
        "{:?}",
        edge.order.lock().unwrap()
    );

    // Content-Length and Transfer-Encoding together: the chunked framing wins (RFC 9112 6.1), the
    // connection closes after the answer, and what follows in the same packet is not a request.
    let (text, closed) = exchange(
        edge.address,
        b"POST /api/flash-sale/order/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\nGET /api/inventory/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(responses(&text), 1, "{text}");
    assert!(closed);
    let forwarded = edge.order.lock().unwrap().clone();
    assert_eq!(forwarded.len(), 1, "{forwarded:?}");
    assert_eq!(forwarded[0].2, "{}", "the body by its chunked framing");
    assert!(
        edge.inventory.lock().unwrap().is_empty(),
        "nothing smuggled through"
    );

    // a path that climbs out of its route stays at its route's upstream
    let (text, _) = exchange(
        edge.address,
        b"GET /api/flash-sale/../inventory/activities HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 "), "{text}");
    assert!(
        edge.inventory.lock().unwrap().is_empty(),
        "never to inventory-service"
    );
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_forwarded_once_each() {
    let edge = edge(|_| {}).await;
    let mut burst = Vec::new();
    for i in 0..50 {
        burst.extend_from_slice(
            format!("GET /api/flash-sale/order/1-{i:032x} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
    }
    burst.extend_from_slice(
        b"GET /api/flash-sale/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let (text, closed) = exchange(edge.address, &burst).await;
    assert!(closed);
    assert_eq!(responses(&text), 51, "{text}");
    let forwarded: Vec<String> = edge
        .order
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.1.clone())
        .collect();
    let expected: Vec<String> = (0..50)
        .map(|i| format!("/api/flash-sale/order/1-{i:032x}"))
        .chain(["/api/flash-sale/last".to_owned()])
        .collect();
    assert_eq!(forwarded, expected, "once each, in order");
}
