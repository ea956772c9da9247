//! The public listener: accepts client connections under caps and serves each with deadlines on
//! every phase, so that no number of slow or idle clients can lock real buyers out.
//!
//! Hand-written over hyper's HTTP/1 connection rather than `axum::serve`, which has no
//! connection caps, no accept-error accounting and one fixed header timer; the rest is hyper's
//! (parsing, limits on the head, keep-alive) and axum's (routing).
//!
//! - **Caps.** A global cap (below the open-file limit, checked at start:
//!   [`ConnectionSettings::check_file_limit`]) and a cap per peer address. Past either, the
//!   connection is closed at once and counted (`gateway_connections_refused_total{reason}`).
//!   Behind trusted proxies the peer is the proxy, so the cap per client counts the client's
//!   requests in flight instead (`routes::proxy`, with [`PerAddress`]): past it a `429`, and the
//!   proxy's connection, which other clients share, stays open.
//! - **Accept errors.** `EMFILE`/`ENFILE` (no file descriptor left) and others are counted
//!   (`gateway_accept_errors_total{kind}`), logged at most once per second, and waited out; the
//!   listener never stops.
//! - **Deadlines per phase**, each counted in `gateway_connection_timeouts_total{phase}` when it
//!   closes a connection: `idle` (kept alive with no request: `idle_timeout_ms`), `head` (from a
//!   request's first byte to its complete head: `head_timeout_ms`), `body` (the handler reads
//!   the body within `body_timeout_ms`: `routes::proxy`). While a request is being handled no
//!   connection deadline runs: the route's upstream timeout bounds it.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use dashmap::DashMap;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::configuration::ConnectionSettings;

/// Where a connection stands, for its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Accepted, or the last answer sent: waiting for a request.
    Idle = 0,
    /// A request's first bytes arrived; its head is not complete.
    Head = 1,
    /// A request is being handled (its body and the upstream have their own timeouts).
    Busy = 2,
}

/// A connection's phase and when it began, shared by its reader, its service and its watcher.
struct Clock {
    origin: Instant,
    phase: AtomicU8,
    /// Milliseconds since `origin` when the phase began.
    since_ms: AtomicU64,
    changed: Notify,
}

impl Clock {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            phase: AtomicU8::new(Phase::Idle as u8),
            since_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Idle,
            1 => Phase::Head,
            _ => Phase::Busy,
        }
    }

    fn enter(&self, phase: Phase) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.since_ms.store(now, Ordering::Release);
        self.phase.store(phase as u8, Ordering::Release);
        self.changed.notify_one();
    }

    /// Idle -> Head when a request's first bytes arrive.
    fn bytes_arrived(&self) {
        if self
            .phase
            .compare_exchange(
                Phase::Idle as u8,
                Phase::Head as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            let now = self.origin.elapsed().as_millis() as u64;
            self.since_ms.store(now, Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// Resolves with the phase whose deadline passed; never while `Busy`.
    async fn expired(&self, idle: Duration, head: Duration) -> Phase {
        loop {
            let changed = self.changed.notified();
            let phase = self.phase();
            let limit = match phase {
                Phase::Idle => idle,
                Phase::Head => head,
                Phase::Busy => {
                    changed.await;
                    continue;
                }
            };
            let since = self.origin + Duration::from_millis(self.since_ms.load(Ordering::Acquire));
            tokio::select! {
                () = changed => continue,
                () = tokio::time::sleep_until((since + limit).into()) => {
                    // Unchanged since we looked: the deadline holds.
                    if self.phase() == phase
                        && self.origin + Duration::from_millis(self.since_ms.load(Ordering::Acquire)) == since
                    {
                        return phase;
                    }
                }
            }
        }
    }
}

/// The client socket, telling the clock when a request's first bytes arrive.
struct Watched {
    stream: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// How many of something (connections, requests in flight) each address holds, under a cap.
#[derive(Debug)]
pub struct PerAddress {
    held: DashMap<IpAddr, u32>,
    max: u32,
}

impl PerAddress {
    /// A cap of `max` per address; 0: no cap (nothing is counted).
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new(Self {
            held: DashMap::new(),
            max,
        })
    }

    /// A place for `ip`, held until the [`Held`] is dropped; `None` when `ip` holds the cap.
    /// Without a cap: a place that counts nothing.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Held> {
        if self.max == 0 {
            return Some(Held(None));
        }
        let mut held = self.held.entry(ip).or_insert(0);
        if *held >= self.max {
            return None;
        }
        *held += 1;
        Some(Held(Some((self.clone(), ip))))
    }

    /// How many places `ip` holds.
    #[cfg(test)]
    fn held_by(&self, ip: IpAddr) -> u32 {
        self.held.get(&ip).map_or(0, |n| *n)
    }
}

/// One place under a [`PerAddress`] cap; dropping it frees it (and the address's entry with
/// its last place, so addresses seen once do not pile up).
pub struct Held(Option<(Arc<PerAddress>, IpAddr)>);

impl Drop for Held {
    fn drop(&mut self) {
        if let Some((per_address, ip)) = self.0.take() {
            per_address.held.remove_if_mut(&ip, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
    }
}

/// One connection's place under the caps; dropping it frees both.
struct Admitted {
    _global: OwnedSemaphorePermit,
    _per_ip: Held,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        metrics::gauge!("gateway_connections_open").decrement(1);
    }
}

/// The caps on open connections.
struct Caps {
    global: Arc<Semaphore>,
    per_ip: Arc<PerAddress>,
}

impl Caps {
    fn new(settings: &ConnectionSettings, max_connections: usize) -> Self {
        Self {
            global: Arc::new(Semaphore::new(max_connections)),
            per_ip: PerAddress::new(settings.max_connections_per_ip),
        }
    }

    /// A place for a connection from `ip`, or why there is none.
    fn admit(&self, ip: IpAddr) -> Result<Admitted, &'static str> {
        let global = self
            .global
            .clone()
            .try_acquire_owned()
            .map_err(|_| "global_cap")?;
        let per_ip = self.per_ip.take(ip).ok_or("ip_cap")?;
        metrics::gauge!("gateway_connections_open").increment(1);
        Ok(Admitted {
            _global: global,
            _per_ip: per_ip,
        })
    }
}

/// Counts and logs accept errors, at most one log line per second.
struct AcceptErrors {
    last_logged: Mutex<Option<Instant>>,
}

impl AcceptErrors {
    /// Counts `error` and says how long to wait before the next accept.
    fn record(&self, error: &std::io::Error) -> Duration {
        // Out of descriptors: one frees when a connection closes; wait a little for it.
        let (kind, pause) = match error.raw_os_error() {
            Some(EMFILE) => ("emfile", Duration::from_millis(50)),
            Some(ENFILE) => ("enfile", Duration::from_millis(50)),
            _ => ("other", Duration::from_millis(5)),
        };
        metrics::counter!("gateway_accept_errors_total", "kind" => kind).increment(1);
        let mut last = self.last_logged.lock().expect("accept log lock");
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            tracing::error!(%error, kind, "accepting a client connection failed; waiting and going on");
        }
        pause
    }
}

/// Most bytes one connection buffers while reading.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// `EMFILE` and `ENFILE` on Linux (asm-generic/errno-base.h).
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// Where connections come from: the TCP listener, or a test's stand-in for the OS.
pub trait Incoming {
    fn accept(&mut self) -> impl Future<Output = std::io::Result<(TcpStream, SocketAddr)>> + Send;
}

impl Incoming for TcpListener {
    async fn accept(&mut self) -> std::io::Result<(TcpStream, SocketAddr)> {
        TcpListener::accept(self).await
    }
}

/// Serves `app` on connections from `incoming` until `stop`; then stops accepting, lets every
/// connection finish the request it is handling, and returns once all have closed.
pub async fn serve(
    mut incoming: impl Incoming,
    app: Router,
    settings: ConnectionSettings,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let max_connections = settings.check_file_limit()?;
    let caps = Caps::new(&settings, max_connections);
    let errors = AcceptErrors {
        last_logged: Mutex::new(None),
    };
    let connections = TaskTracker::new();
    describe_metrics();
    tracing::info!(
        max_connections,
        max_connections_per_ip = settings.max_connections_per_ip,
        "gateway accepting connections"
    );
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = incoming.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                let pause = errors.record(&error);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(pause) => continue,
                }
            }
        };
        let admitted = match caps.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(reason) => {
                metrics::counter!("gateway_connections_refused_total", "reason" => reason)
                    .increment(1);
                drop(stream);
                continue;
            }
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set on an accepted connection");
        }
        let (app, settings, stop) = (app.clone(), settings.clone(), stop.clone());
        connections.spawn(async move {
            serve_connection(stream, peer, app, &settings, stop).await;
            drop(admitted);
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Every series of this module at zero, so a dashboard or an alert sees "none yet" rather than
/// nothing (a `rate()` over a series that appears with its first event misses that event).
fn describe_metrics() {
    for reason in ["global_cap", "ip_cap", "client_cap"] {
        metrics::counter!("gateway_connections_refused_total", "reason" => reason).increment(0);
    }
    for kind in ["emfile", "enfile", "other"] {
        metrics::counter!("gateway_accept_errors_total", "kind" => kind).increment(0);
    }
    for phase in ["head", "body", "idle"] {
        metrics::counter!("gateway_connection_timeouts_total", "phase" => phase).increment(0);
    }
    metrics::gauge!("gateway_connections_open").increment(0.0);
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    settings: &ConnectionSettings,
    stop: CancellationToken,
) {
    let clock = Arc::new(Clock::new());
    let io = TokioIo::new(Watched {
        stream,
        clock: clock.clone(),
    });
    let service_clock = clock.clone();
    let service = tower::service_fn(
        move |mut request: axum::extract::Request<hyper::body::Incoming>| {
            let (app, clock) = (app.clone(), service_clock.clone());
            request.extensions_mut().insert(ConnectInfo(peer));
            async move {
                clock.enter(Phase::Busy);
                let response = app.oneshot(request.map(axum::body::Body::new)).await;
                clock.enter(Phase::Idle);
                response
            }
        },
    );
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The deadlines are this module's (they tell idle from slow); hyper's own header timer
        // would count both as one.
        .header_read_timeout(None)
        .max_headers(settings.max_headers)
        .max_header_size(settings.max_head_bytes)
        // What one connection may buffer (a pipelined flood included): a head and a body.
        .max_buf_size(READ_BUFFER_BYTES);
    let connection = builder.serve_connection(io, TowerToHyperService::new(service));
    tokio::pin!(connection);
    let idle = Duration::from_millis(settings.idle_timeout_ms);
    let head = Duration::from_millis(settings.head_timeout_ms);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, %peer, "client connection ended with an error");
            }
        }
        phase = clock.expired(idle, head) => {
            let phase = if phase == Phase::Idle { "idle" } else { "head" };
            metrics::counter!("gateway_connection_timeouts_total", "phase" => phase).increment(1);
            tracing::debug!(%peer, phase, "client connection closed: too slow");
        }
        () = stop.cancelled() => {
            // Finish the request in hand, answer it with `Connection: close`, then close.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The OS out of file descriptors for the first `errors_left` accepts, then the real listener.
    struct Exhausted {
        listener: TcpListener,
        errors_left: usize,
    }

    impl Incoming for Exhausted {
        async fn accept(&mut self) -> std::io::Result<(TcpStream, SocketAddr)> {
            if self.errors_left > 0 {
                self.errors_left -= 1;
                return Err(std::io::Error::from_raw_os_error(EMFILE));
            }
            self.listener.accept().await
        }
    }

    #[test]
    fn an_address_holds_at_most_its_cap_and_its_entry_goes_with_its_last_place() {
        let caps = PerAddress::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = caps.take(a).expect("first place");
        let second = caps.take(a).expect("second place");
        assert!(caps.take(a).is_none(), "a third is past the cap");
        assert!(caps.take(b).is_some(), "another address has its own places");
        drop(first);
        let third = caps.take(a).expect("a freed place is taken again");
        drop((second, third));
        assert_eq!(caps.held_by(a), 0);
        assert!(
            caps.held.is_empty(),
            "no entry left for addresses holding nothing"
        );

        let uncapped = PerAddress::new(0);
        let places: Vec<_> = (0..1000).map(|_| uncapped.take(a).unwrap()).collect();
        assert_eq!(places.len(), 1000);
        assert!(uncapped.held.is_empty(), "without a cap nothing is counted");
    }

    #[tokio::test]
    async fn out_of_file_descriptors_the_listener_waits_and_goes_on() {
        let handle = flash_sale_common::telemetry::metrics_handle();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "up" }));
        let stop = CancellationToken::new();
        let incoming = Exhausted {
            listener,
            errors_left: 5,
        };
        let server = tokio::spawn(serve(
            incoming,
            app,
            ConnectionSettings::default(),
            stop.clone(),
        ));
        // A client that connects while no descriptor is left is served once one is back.
        let mut client = TcpStream::connect(address).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("up"), "{answer}");
        let errors = handle
            .render()
            .lines()
            .find_map(|l| {
                l.strip_prefix(r#"gateway_accept_errors_total{kind="emfile"}"#)?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0);
        assert!(errors >= 5.0, "{errors}");
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
