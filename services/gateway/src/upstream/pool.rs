//! Keep-alive HTTP/1.1 connections to one upstream, each driven by the request that holds it.
//!
//! hyper's pooled client runs every connection as a task of its own: a proxied request hands its
//! message to that task, is woken with the answer, and the connection returns to the pool through
//! one more task spawned per request. Here the request's own task polls the connection while it
//! waits, so a proxied request costs no extra task and no wake-up across tasks. Nobody polls an
//! idle connection; one the upstream closed meanwhile shows its end when it is next taken, before
//! anything is written to it, and the request goes out on another.
//!
//! The answer is read whole (up to a limit): the services answer small JSON documents, and a
//! connection can only go back to the pool once its answer has been read.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Request, Response};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
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

/// The connections to one upstream `host:port`.
#[derive(Debug)]
pub(super) struct Pool {
    /// Resolved for every new connection, so a Service name that moves keeps working.
    address: String,
    settings: PoolSettings,
    /// Most recently used last: taking the newest keeps few connections warm, and the oldest
    /// sit at the front, where they expire.
    idle: Mutex<VecDeque<Idle>>,
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

impl Pool {
    pub(super) fn new(address: String, settings: PoolSettings) -> Self {
        Self {
            address,
            settings,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// Sends `request` (origin-form URI, `Host` set) and reads the whole answer, at most
    /// `limit` bytes of body. A request whose pooled connection turns out to be closed before
    /// anything was written goes out again on another one.
    pub(super) async fn exchange(
        &self,
        mut request: Request<Full<Bytes>>,
        limit: usize,
    ) -> Result<Response<Bytes>, ExchangeError> {
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            match conn.exchange(request, limit).await {
                Ok(response) => {
                    if conn.reusable() {
                        self.checkin(conn);
                    }
                    return Ok(response);
                }
                Err(Failure::Unsent(unsent)) if reused => request = *unsent,
                // A new connection that cannot take a request is as good as none.
                Err(Failure::Unsent(_)) => {
                    return Err(ExchangeError::Connect(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the new connection closed before the request could be sent",
                    )));
                }
                Err(Failure::Failed(error)) => return Err(error),
            }
        }
    }

    /// How many idle connections the pool holds now.
    pub(super) fn idle(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // The queue is consistent after every push and pop; a panic elsewhere cannot break it.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.lock();
        let newest = idle.pop_back()?;
        if newest.since.elapsed() < self.settings.idle_timeout {
            return Some(newest.conn);
        }
        // The newest has expired, so have all the others.
        let expired = std::mem::take(&mut *idle);
        drop(idle);
        drop((newest, expired));
        None
    }

    fn checkin(&self, conn: Conn) {
        let now = Instant::now();
        let mut idle = self.lock();
        idle.push_back(Idle { conn, since: now });
        let mut closing = Vec::new();
        while idle.len() > self.settings.max_idle
            || idle
                .front()
                .is_some_and(|oldest| now - oldest.since >= self.settings.idle_timeout)
        {
            closing.extend(idle.pop_front());
        }
        // Closing sockets is done outside the lock.
        drop(idle);
        drop(closing);
    }

    async fn connect(&self) -> Result<Conn, ExchangeError> {
        let connecting = TcpStream::connect(self.address.as_str());
        let stream = tokio::time::timeout(self.settings.connect_timeout, connecting)
            .await
            .map_err(|_| {
                ExchangeError::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no connection within {} ms",
                        self.settings.connect_timeout.as_millis()
                    ),
                ))
            })?
            .map_err(ExchangeError::Connect)?;
        stream.set_nodelay(true).map_err(ExchangeError::Connect)?;
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ExchangeError::Http)?;
        Ok(Conn {
            sender,
            driver: Some(driver),
        })
    }
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

    /// Closes the connection (the rest of an answer may still be on it).
    fn end(&mut self) {
        self.driver = None;
    }

    async fn exchange(
        &mut self,
        request: Request<Full<Bytes>>,
        limit: usize,
    ) -> Result<Response<Bytes>, Failure> {
        // Whatever came while the connection was idle (the upstream closed it) shows now. The
        // no-op waker wakes nobody; the polls below register this task.
        let idle_check = self.drive(&mut Context::from_waker(Waker::noop()));
        if idle_check.is_ready() || !self.sender.is_ready() {
            return Err(Failure::Unsent(Box::new(request)));
        }

        let mut answer = pin!(self.sender.try_send_request(request));
        let head = poll_fn(|cx| {
            if let Poll::Ready(answer) = answer.as_mut().poll(cx) {
                return Poll::Ready(answer);
            }
            match self.drive(cx) {
                Poll::Pending => Poll::Pending,
                // The driver is gone, and with it every request it held is settled.
                Poll::Ready(_) => answer.as_mut().poll(cx),
            }
        })
        .await;
        let response = match head {
            Ok(response) => response,
            Err(mut error) => {
                return Err(match error.take_message() {
                    Some(request) => Failure::Unsent(Box::new(request)),
                    None => Failure::Failed(ExchangeError::Http(error.into_error())),
                });
            }
        };

        let (parts, body) = response.into_parts();
        let mut body = pin!(Limited::new(body, limit).collect());
        let body = poll_fn(|cx| {
            if let Poll::Ready(body) = body.as_mut().poll(cx) {
                return Poll::Ready(body.map_err(Some));
            }
            match self.drive(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(error) => match body.as_mut().poll(cx) {
                    Poll::Ready(body) => Poll::Ready(body.map_err(Some)),
                    Poll::Pending => Poll::Ready(Err(error.map(Into::into))),
                },
            }
        })
        .await;
        let body = match body {
            Ok(collected) => collected.to_bytes(),
            Err(Some(error)) if error.is::<LengthLimitError>() => {
                // The rest of the answer is still on the wire: the connection is not reused.
                self.end();
                return Err(Failure::Failed(ExchangeError::TooLarge));
            }
            Err(error) => {
                self.end();
                return Err(Failure::Failed(
                    match error.and_then(|e| e.downcast::<hyper::Error>().ok()) {
                        Some(error) => ExchangeError::Http(*error),
                        None => ExchangeError::Closed,
                    },
                ));
            }
        };
        // Lets the driver finish the exchange and wait for the next request (or notice that the
        // upstream closes the connection after this answer).
        let _ = self.drive(&mut Context::from_waker(Waker::noop()));
        Ok(Response::from_parts(parts, body))
    }
}
