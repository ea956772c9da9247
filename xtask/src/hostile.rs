//! The hostile-load drill (`cargo xtask drill --part hostile`): real buyers keep buying through
//! the gateway, with their usual latency, while one address floods it with slow heads and idle
//! connections.
//!
//! After a warm-up sale, two sales of the same size through the same gateway, buyers from
//! 127.0.0.2: the first in quiet, the second while the attacker (127.0.0.1) holds up to
//! [`SLOW_HEADS`] connections that trickle a head that never ends and up to [`IDLE`] that send
//! nothing, reopening each one the gateway closes. Loopback only, bounded in count and in time
//! (the second sale's length). The attacker's own CPU is not the gateway's doing (a real one
//! has machines of its own), so its thread runs at the lowest priority, [`ATTACKER_NICE`]: on
//! two shared cores it would otherwise take its CPU from the gateway and the buyers.
//!
//! Passes when the attack reached its size, the second sale's P99 is within twice the first's
//! (plus [`NOISE_FLOOR`]), no buyer got a 5xx or no answer, and the invariants hold for both
//! sales. In the CI's `--short` form too (docs/drills.md has the runs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use flash_sale_tests::scenario::{LoadReport, SaleConfig, Stores, drive_sale};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// Where the attacker and the buyers come from.
const ATTACKER: &str = "127.0.0.1";
pub(crate) const BUYERS: &str = "127.0.0.2";
/// Connections the attacker keeps trickling a head on.
const SLOW_HEADS: usize = 600;
/// Connections the attacker opens and leaves idle.
const IDLE: usize = 600;
/// Most connections the attacker opens per second, per kind (bounds its own CPU).
const OPENS_PER_SEC: u64 = 200;
/// Slices of a second the trickling connections are spread over.
const TRICKLE_SLICES: usize = 20;
/// The attacker thread's nice value: it runs on what the gateway and the buyers leave.
const ATTACKER_NICE: i32 = 19;
/// Added to twice the quiet P99 before comparing: on two shared cores a few ms of scheduling
/// noise are not an attack's doing.
pub(crate) const NOISE_FLOOR: Duration = Duration::from_millis(20);

/// What the attacker managed.
#[derive(Debug, Default)]
pub(crate) struct AttackReport {
    pub(crate) opened: usize,
    /// Connections the gateway closed: at once (past a cap) or at a deadline.
    pub(crate) closed_by_gateway: usize,
    pub(crate) failed_to_connect: usize,
}

#[derive(Default)]
struct Counts {
    opened: AtomicUsize,
    closed: AtomicUsize,
    failed: AtomicUsize,
}

/// A client pinned to the buyers' address.
pub(crate) fn buyers_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .local_address(BUYERS.parse::<std::net::IpAddr>()?)
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(30))
        .build()?)
}

async fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{ATTACKER}:0").parse().expect("a socket address"))?;
    socket.connect(to).await
}

/// Keeps `count` connections open to `to`; with `head`, each trickles a header line every
/// second after a request line, never ending the head. Reopens what the gateway closes.
async fn hold(
    to: SocketAddr,
    count: usize,
    head: bool,
    counts: Arc<Counts>,
    stop: CancellationToken,
) {
    let mut open: Vec<TcpStream> = Vec::with_capacity(count);
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / OPENS_PER_SEC.max(1)));
    // Each connection trickles once a second, the connections spread over the second as
    // independent clients would be (one burst of all of them at once is one loop's artifact).
    let mut trickle = tokio::time::interval(Duration::from_secs(1) / TRICKLE_SLICES as u32);
    let mut slice = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick(), if open.len() < count => {
                match connect(to).await {
                    Ok(mut stream) => {
                        counts.opened.fetch_add(1, Ordering::Relaxed);
                        if head && stream
                            .write_all(b"POST /api/flash-sale/order/create HTTP/1.1\r\nHost: x\r\n")
                            .await
                            .is_err()
                        {
                            counts.closed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        open.push(stream);
                    }
                    Err(_) => {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ = trickle.tick() => {
                let mut buf = [0u8; 512];
                let before = open.len();
                let mut kept = Vec::with_capacity(open.len());
                slice = (slice + 1) % TRICKLE_SLICES;
                for (i, stream) in open.drain(..).enumerate() {
                    if i % TRICKLE_SLICES != slice {
                        kept.push(stream);
                        continue;
                    }
                    let alive = match stream.try_read(&mut buf) {
                        Ok(0) => false,
                        Ok(_) => false, // an answer (408/4xx): the gateway is done with it
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                        Err(_) => false,
                    };
                    let alive = alive && (!head || stream.try_write(b"X-Trickle: 1\r\n").is_ok());
                    if alive {
                        kept.push(stream);
                    }
                }
                counts.closed.fetch_add(before - kept.len(), Ordering::Relaxed);
                open = kept;
            }
        }
    }
}

/// The attack, running until [`Attack::stop`] on a thread and runtime of its own: on the
/// buyers' runtime its tasks would queue ahead of the buyers' and inflate the latency the drill
/// measures, which is the load generator's, not the gateway's.
pub(crate) struct Attack {
    stop: CancellationToken,
    counts: Arc<Counts>,
    thread: std::thread::JoinHandle<()>,
}

impl Attack {
    pub(crate) fn start(gateway: SocketAddr) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let counts = Arc::new(Counts::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (task_stop, task_counts) = (stop.clone(), counts.clone());
        let thread = std::thread::Builder::new()
            .name("attacker".into())
            .spawn(move || {
                // Linux's nice value is per thread: with no pid, this thread's alone.
                if let Err(error) = rustix::process::setpriority_process(None, ATTACKER_NICE) {
                    eprintln!("the attacker keeps its priority: {error}");
                }
                runtime.block_on(async move {
                    let slow = hold(
                        gateway,
                        SLOW_HEADS,
                        true,
                        task_counts.clone(),
                        task_stop.clone(),
                    );
                    let idle = hold(gateway, IDLE, false, task_counts, task_stop);
                    tokio::join!(slow, idle);
                });
            })?;
        Ok(Self {
            stop,
            counts,
            thread,
        })
    }

    pub(crate) async fn stop(self) -> AttackReport {
        self.stop.cancel();
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        AttackReport {
            opened: self.counts.opened.load(Ordering::Relaxed),
            closed_by_gateway: self.counts.closed.load(Ordering::Relaxed),
            failed_to_connect: self.counts.failed.load(Ordering::Relaxed),
        }
    }
}

/// The two sales: quiet, then under attack. Returns both loads and the attack's figures.
pub(crate) async fn sales(
    gateway_url: &str,
    config: impl Fn(i64, i64) -> SaleConfig,
) -> anyhow::Result<(LoadReport, LoadReport, AttackReport)> {
    let buyers = buyers_client()?;
    // A first sale warms the connections and the services up, so that the quiet one is not a
    // cold start compared with a warm one.
    drive_sale(&buyers, gateway_url, &config(1, 20_000_000)).await;
    let quiet = drive_sale(&buyers, gateway_url, &config(2, 1)).await;
    let address: SocketAddr = gateway_url
        .trim_start_matches("http://")
        .parse()
        .context("the gateway's address")?;
    let attack = Attack::start(address)?;
    // Let the attacker reach its caps before the buyers come (600 opens at 200 a second).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let loud = drive_sale(&buyers, gateway_url, &config(3, 10_000_000)).await;
    let attack = attack.stop().await;
    Ok((quiet, loud, attack))
}

/// Whether the buyers under attack kept their latency: the verdict's line, or why not.
pub(crate) fn latency_verdict(
    quiet: &LoadReport,
    loud: &LoadReport,
    attack: &AttackReport,
) -> Result<String, String> {
    let (q, l) = (quiet.latency_ms[2], loud.latency_ms[2]);
    let bound = 2.0 * q + NOISE_FLOOR.as_secs_f64() * 1000.0;
    let line = format!("buyers' P99 {q:.1} ms quiet, {l:.1} ms under attack (bound {bound:.1} ms)");
    if attack.opened < SLOW_HEADS + IDLE {
        return Err(format!(
            "{line}; the attack opened {} connections, short of its {}: it proves nothing",
            attack.opened,
            SLOW_HEADS + IDLE
        ));
    }
    let failures = loud.count_5xx() + loud.transport_errors;
    if failures > 0 {
        return Err(format!("{line}; {failures} buyers got a 5xx or no answer"));
    }
    if l <= bound { Ok(line) } else { Err(line) }
}

/// Both sales drained, and the invariants of the quiet one (the loud one is the drill's row).
pub(crate) async fn quiet_invariants(
    stores: &Stores,
    stock: i64,
    quiet: &LoadReport,
) -> anyhow::Result<()> {
    stores.wait_for_drain(2, Duration::from_secs(120)).await?;
    stores
        .check_invariants(2, stock, &quiet.accepted)
        .await?
        .ensure()
}
