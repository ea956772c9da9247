//! Keep-alive HTTP/1.1 connections to one upstream, each driven by the request that holds it.
//!
//! hyper's pooled client runs every connection as a task of its own: a proxied request hands its
//! message to that task, is woken with the answer, and the connection returns to the pool through
//! one more task spawned per request. Here the request's own task polls the connection while it
//! waits, so a proxied request costs no extra task and no wake-up across tasks. Nobody polls an
//! idle connection; one the upstream closed meanwhile shows its end when it is next taken, before
//! anything is written to it, and the request goes out on another.
//!
//! Two things keep the pool whole under a burst:
//! - A request that finds no idle connection opens one, and meanwhile waits for any connection
//!   that comes back; it takes whichever is ready first. A burst of new connections may lose SYNs
//!   and wait out a one-second retransmission; the connections already open serve it meanwhile.
//! - A request abandoned mid-exchange (its client went away) leaves its connection to a small
//!   task that reads the rest of the answer and returns the connection to the pool, up to the
//!   request's deadline. Closing it instead would cost a new connection for every client that
//!   leaves, a thousand at once when a load test stops.
//!
//! The answer is read whole (up to a limit): the services answer small JSON documents, and a
//! connection can only go back to the pool once its answer has been read.
//!
//! On trial (docs/performance.md, "The upstream pool on trial"): with the broker's durable log it
//! used 9 µs (about 11 %) less of the gateway's CPU per order than hyper-util's pooled client at
//! the median of five interleaved rounds, within the rounds' spread of 21 µs, in a run disturbed
//! by a build. hyper-util's client is the alternative behind `upstreams.client`; the pool goes
//! unless a quiet run shows it winning beyond the spread.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::response::Parts;
use axum::http::{Request, Response};
use http_body_util::combinators::Collect;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Why an exchange produced no answer.
#[derive(Debug)]
pub(super) enum ExchangeError {
    /// No connection could be opened (refused, name not resolved, or slower than the connect
    /// timeout): nothing was sent.
    Connect(io::Error),
    /// The connection failed once the request could have been written, or the answer was not
    /// HTTP.
    Http(hyper::Error),
    /// The connection ended without an answer and without an error from hyper.
    Closed,
    /// The answer's body was longer than the limit.
    TooLarge,
    /// hyper-util's client failed after connecting (`upstreams.client = "hyper-util"`).
    Client(hyper_util::client::legacy::Error),
    /// No whole answer before the deadline; the connection was closed.
    TimedOut,
}

/// How the pool is sized and how long it waits.
#[derive(Debug, Clone, Copy)]
pub(super) struct PoolSettings {
    /// Idle connections kept; more are closed when they come back.
    pub(super) max_idle: usize,
    /// An idle connection older than this is closed instead of used.
    pub(super) idle_timeout: Duration,
    pub(super) connect_timeout: Duration,
}

/// What a pool holds and has done (`gateway_upstream_connections_total` counts the same events).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Connections kept idle now.
    pub idle: usize,
    /// Connections opened so far.
    pub opened: u64,
    /// Requests that waited for a new connection and were served by one that came back first.
    pub handed_over: u64,
    /// Connections whose request was abandoned, then finished and pooled again.
    pub rescued: u64,
}

/// The connections to one upstream `host:port`.
#[derive(Debug, Clone)]
pub(super) struct Pool(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    /// The `downstream` label of the pool's metrics.
    downstream: &'static str,
    /// Resolved for every new connection, so a Service name that moves keeps working.
    address: String,
    settings: PoolSettings,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Most recently used last: taking the newest keeps few connections warm, and the oldest
    /// sit at the front, where they expire.
    idle: VecDeque<Idle>,
    /// Requests opening a connection, oldest first; a connection that comes back goes to the
    /// first of them still waiting.
    waiters: VecDeque<oneshot::Sender<Conn>>,
    counts: PoolCounts,
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

impl Pool {
    pub(super) fn new(downstream: &'static str, address: String, settings: PoolSettings) -> Self {
        Self(Arc::new(Shared {
            downstream,
            address,
            settings,
            state: Mutex::new(State::default()),
        }))
    }

    /// Sends `request` (origin-form URI, `Host` set) and reads the whole answer, at most
    /// `limit` bytes of body, all within `timeout`. A request whose pooled connection turns out
    /// to be closed before anything was written goes out again on another one.
    ///
    /// Dropping the returned future mid-exchange leaves the connection to finish the exchange on
    /// its own (until the same deadline) and return to the pool.
    pub(super) async fn exchange(
        &self,
        mut request: Request<Full<Bytes>>,
        limit: usize,
        timeout: Duration,
    ) -> Result<Response<Bytes>, ExchangeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let (conn, reused) = tokio::time::timeout_at(deadline, self.take())
                .await
                .map_err(|_| ExchangeError::TimedOut)??;
            let mut lease = Lease {
                pool: self,
                conn: Some(conn),
                stage: Stage::Idle,
                limit,
                deadline,
            };
            let exchanged = tokio::time::timeout_at(deadline, lease.exchange(request)).await;
            match exchanged {
                Ok(Ok(response)) => {
                    lease.release();
                    return Ok(response);
                }
                Ok(Err(Failure::Unsent(unsent))) if reused => {
                    lease.close();
                    request = *unsent;
                }
                // A new connection that cannot take a request is as good as none.
                Ok(Err(Failure::Unsent(_))) => {
                    lease.close();
                    return Err(ExchangeError::Connect(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the new connection closed before the request could be sent",
                    )));
                }
                Ok(Err(Failure::Failed(error))) => {
                    lease.close();
                    return Err(error);
                }
                Err(_) => {
                    lease.close();
                    return Err(ExchangeError::TimedOut);
                }
            }
        }
    }

    pub(super) fn counts(&self) -> PoolCounts {
        let state = self.lock();
        PoolCounts {
            idle: state.idle.len(),
            ..state.counts
        }
    }

    /// Counts a connection event here and in `gateway_upstream_connections_total`.
    fn count(&self, field: fn(&mut PoolCounts) -> &mut u64, event: &'static str) {
        *field(&mut self.lock().counts) += 1;
        metrics::counter!(
            "gateway_upstream_connections_total",
            "downstream" => self.0.downstream,
            "event" => event
        )
        .increment(1);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every push and pop; a panic elsewhere cannot break it.
        self.0
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An idle connection (`true`: it may have been closed meanwhile), or else a new one or one
    /// that came back, whichever is first.
    async fn take(&self) -> Result<(Conn, bool), ExchangeError> {
        let (expired, receiver) = {
            let mut state = self.lock();
            match state.idle.pop_back() {
                Some(newest) if newest.since.elapsed() < self.0.settings.idle_timeout => {
                    return Ok((newest.conn, true));
                }
                // The newest has expired, so have all the others: they are closed below,
                // outside the lock.
                newest => {
                    let expired = (newest, std::mem::take(&mut state.idle));
                    while state.waiters.front().is_some_and(|w| w.is_closed()) {
                        state.waiters.pop_front();
                    }
                    let (sender, receiver) = oneshot::channel();
                    state.waiters.push_back(sender);
                    (expired, receiver)
                }
            }
        };
        drop(expired);

        let mut waiting = Waiting {
            pool: self,
            receiver,
        };
        let mut connecting = pin!(self.connect());
        tokio::select! {
            biased;
            Ok(conn) = &mut waiting.receiver => {
                self.count(|c| &mut c.handed_over, "handed_over");
                Ok((conn, true))
            }
            connected = &mut connecting => connected.map(|conn| (conn, false)),
        }
    }

    /// A connection whose exchange is complete: to the oldest request still waiting for one,
    /// else to the idle ones.
    fn checkin(&self, mut conn: Conn) {
        let now = Instant::now();
        let mut closing = Vec::new();
        let mut state = self.lock();
        while let Some(waiter) = state.waiters.pop_front() {
            match waiter.send(conn) {
                Ok(()) => return,
                Err(back) => conn = back,
            }
        }
        state.idle.push_back(Idle { conn, since: now });
        let settings = self.0.settings;
        while state.idle.len() > settings.max_idle
            || state
                .idle
                .front()
                .is_some_and(|oldest| now - oldest.since >= settings.idle_timeout)
        {
            closing.extend(state.idle.pop_front());
        }
        // Closing sockets is done outside the lock.
        drop(state);
        drop(closing);
    }

    async fn connect(&self) -> Result<Conn, ExchangeError> {
        let settings = self.0.settings;
        let connecting = TcpStream::connect(self.0.address.as_str());
        let stream = tokio::time::timeout(settings.connect_timeout, connecting)
            .await
            .map_err(|_| {
                ExchangeError::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no connection within {} ms",
                        settings.connect_timeout.as_millis()
                    ),
                ))
            })?
            .map_err(ExchangeError::Connect)?;
        stream.set_nodelay(true).map_err(ExchangeError::Connect)?;
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ExchangeError::Http)?;
        self.count(|c| &mut c.opened, "opened");
        Ok(Conn {
            sender,
            driver: Some(driver),
        })
    }
}

/// A request's place in the queue for a connection that comes back. A connection handed over
/// after the request stopped waiting (it opened its own, or was abandoned) goes back.
struct Waiting<'p> {
    pool: &'p Pool,
    receiver: oneshot::Receiver<Conn>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.receiver.close();
        if let Ok(spare) = self.receiver.try_recv() {
            self.pool.checkin(spare);
        }
    }
}

/// A connection taken from the pool for one exchange. It goes back with [`Lease::release`] or
/// is closed with [`Lease::close`]. Dropped with its exchange unfinished (the request was
/// abandoned), it is finished by a task of its own, until the request's deadline, and goes back
/// then: hyper closes a connection whose answer nobody waits for.
struct Lease<'p> {
    pool: &'p Pool,
    conn: Option<Conn>,
    stage: Stage,
    limit: usize,
    deadline: Instant,
}

impl Lease<'_> {
    async fn exchange(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Bytes>, Failure> {
        let conn = self.conn.as_mut().expect("a lease holds its connection");
        self.stage = conn.start(request)?;
        poll_fn(|cx| conn.poll_exchange(&mut self.stage, self.limit, cx)).await
    }

    fn release(mut self) {
        if let Some(conn) = self.conn.take()
            && conn.reusable()
        {
            self.pool.checkin(conn);
        }
    }

    fn close(mut self) {
        self.conn = None;
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let (Some(mut conn), Stage::Head(_) | Stage::Body(..)) = (self.conn.take(), &self.stage)
        else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut stage = std::mem::replace(&mut self.stage, Stage::Idle);
        let (pool, limit) = (self.pool.clone(), self.limit);
        let deadline = self.deadline;
        runtime.spawn(async move {
            let finish = async {
                let answered = poll_fn(|cx| conn.poll_exchange(&mut stage, limit, cx)).await;
                answered.is_ok() && poll_fn(|cx| conn.poll_idle(cx)).await
            };
            let finished = tokio::time::timeout_at(deadline, finish).await;
            if let Ok(true) = finished {
                pool.count(|c| &mut c.rescued, "rescued");
                pool.checkin(conn);
            }
        });
    }
}

/// The answer to a request sent on a connection.
type Answer = Pin<
    Box<dyn Future<Output = Result<Response<Incoming>, TrySendError<Request<Full<Bytes>>>>> + Send>,
>;

/// Where an exchange on a connection is.
enum Stage {
    /// No exchange under way.
    Idle,
    /// The request is sent (or about to be, when the connection is next driven); its answer's
    /// head has not come.
    Head(Answer),
    /// The answer's body is being read.
    Body(Box<Parts>, Collect<Limited<Incoming>>),
}

enum Failure {
    /// Nothing was written: the request can go out on another connection.
    Unsent(Box<Request<Full<Bytes>>>),
    Failed(ExchangeError),
}

/// One connection: the handle requests are sent through, and the state machine that does the
/// reading and writing when polled.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// `None` once the connection has ended. Dropping the driver settles whatever it still
    /// held: a request it never wrote comes back to the sender unsent, a body being read ends.
    driver: Option<Connection<TokioIo<TcpStream>, Full<Bytes>>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("ended", &self.driver.is_none())
            .finish()
    }
}

impl Conn {
    fn reusable(&self) -> bool {
        self.driver.is_some() && !self.sender.is_closed()
    }

    /// Polls the driver; `Ready` once the connection has ended (with hyper's error, if any).
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<Option<hyper::Error>> {
        let Some(driver) = &mut self.driver else {
            return Poll::Ready(None);
        };
        match Pin::new(driver).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                self.driver = None;
                Poll::Ready(result.err())
            }
        }
    }

    /// Hands `request` to the connection, or gives it back if the connection turns out to
    /// have ended while it was idle.
    fn start(&mut self, request: Request<Full<Bytes>>) -> Result<Stage, Failure> {
        // Whatever came while the connection was idle (the upstream closed it) shows now. The
        // no-op waker wakes nobody; the exchange's polls register its task.
        let idle_check = self.drive(&mut Context::from_waker(Waker::noop()));
        if idle_check.is_ready() || !self.sender.is_ready() {
            return Err(Failure::Unsent(Box::new(request)));
        }
        Ok(Stage::Head(Box::pin(self.sender.try_send_request(request))))
    }

    /// Drives the exchange in `stage` to the whole answer (a body of at most `limit` bytes).
    fn poll_exchange(
        &mut self,
        stage: &mut Stage,
        limit: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<Bytes>, Failure>> {
        loop {
            match stage {
                Stage::Idle => unreachable!("an exchange is polled after it started"),
                Stage::Head(answer) => {
                    let head = match answer.as_mut().poll(cx) {
                        Poll::Ready(head) => head,
                        Poll::Pending => match self.drive(cx) {
                            Poll::Pending => return Poll::Pending,
                            // The driver is gone, and with it every request it held is
                            // settled.
                            Poll::Ready(_) => ready!(answer.as_mut().poll(cx)),
                        },
                    };
                    match head {
                        Ok(response) => {
                            let (parts, body) = response.into_parts();
                            *stage =
                                Stage::Body(Box::new(parts), Limited::new(body, limit).collect());
                        }
                        Err(mut error) => {
                            *stage = Stage::Idle;
                            return Poll::Ready(Err(match error.take_message() {
                                Some(request) => Failure::Unsent(Box::new(request)),
                                None => Failure::Failed(ExchangeError::Http(error.into_error())),
                            }));
                        }
                    }
                }
                Stage::Body(_, body) => {
                    let body = match Pin::new(&mut *body).poll(cx) {
                        Poll::Ready(body) => body.map_err(Some),
                        Poll::Pending => match self.drive(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(error) => match Pin::new(body).poll(cx) {
                                Poll::Ready(body) => body.map_err(Some),
                                Poll::Pending => Err(error.map(Into::into)),
                            },
                        },
                    };
                    let Stage::Body(parts, _) = std::mem::replace(stage, Stage::Idle) else {
                        unreachable!("the stage was Body");
                    };
                    return Poll::Ready(match body {
                        Ok(collected) => {
                            // Lets the driver finish the exchange and wait for the next request
                            // (or notice that the upstream closes the connection after this
                            // answer).
                            let _ = self.drive(&mut Context::from_waker(Waker::noop()));
                            Ok(Response::from_parts(*parts, collected.to_bytes()))
                        }
                        // The rest of the answer is still on the wire: the connection is not
                        // reused.
                        Err(Some(error)) if error.is::<LengthLimitError>() => {
                            Err(Failure::Failed(ExchangeError::TooLarge))
                        }
                        Err(error) => Err(Failure::Failed(
                            match error.and_then(|e| e.downcast::<hyper::Error>().ok()) {
                                Some(error) => ExchangeError::Http(*error),
                                None => ExchangeError::Closed,
                            },
                        )),
                    });
                }
            }
        }
    }

    /// After an exchange: `true` once the connection can take the next request, `false` if it
    /// ended instead.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if self.drive(cx).is_ready() {
            return Poll::Ready(false);
        }
        match self.sender.poll_ready(cx) {
            Poll::Ready(ready) => Poll::Ready(ready.is_ok() && self.reusable()),
            Poll::Pending => Poll::Pending,
        }
    }
}
