//! `cargo xtask bench`: order-service's paths measured against a baseline taken in the same run
//! on the same machine: a bare axum handler that parses the same body and makes one Redis Lua
//! call through one multiplexed connection (the reference point of docs/performance.md). Load
//! comes from `wrk` (a separate process, 2 threads), on 127.0.0.1 only, for a bounded time.
//!
//! The accepted-order load runs in rounds (`--rounds`) of three: straight at order-service,
//! through a bare proxy (`services/gateway/examples/bare_proxy.rs`: what any HTTP hop costs on
//! this machine) and through the gateway; each run on a fresh activity and after the consumer
//! has written every earlier order to MySQL, so no run inherits another's backlog. Each round
//! starts with the baseline again, so that each arm's rate can be read against the machine's
//! speed in its own round as well as against the whole run's.
//!
//! The broker keeps its log in SQLite, as in the main job, so a 202 means what it means in
//! service: the order is in a log that outlives a broker restart. `--broker memory` measures
//! with the log in memory instead, where an acknowledged order is lost with the broker.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use axum::Router;
use axum::routing::post;
use flash_sale_tests::admission::{drive_room_sale, peak_per_second};
use flash_sale_tests::apps::http_client;
use flash_sale_tests::scenario::{Admin, LoadProgress, SaleConfig, Stores};
use flash_sale_tests::stack::{BrokerStorage, Server, Stack, StackOptions, free_port};

use crate::services::{self, LOCAL_ADMIN_TOKEN};
use flash_sale_common::api;
use flash_sale_common::domain::ActivityId;
use flash_sale_common::error::ErrorCode;
use flash_sale_common::redis::ActivityKeys;

/// One measured run.
struct Run {
    name: String,
    requests: u64,
    requests_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx_3xx: u64,
    /// wrk's `Socket errors:` (connect + read + write + timeout): connections that failed, not
    /// answers; a run with many measures reconnecting, not serving.
    socket_errors: u64,
}

/// `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Length of each measured run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// wrk's connections.
    #[arg(long, default_value_t = 1000)]
    connections: u64,
    /// Rounds of the accepted-order arms, each arm first in turn.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Where the broker keeps its log: `sqlite` (durable, as in the main job) or `memory`.
    #[arg(long, default_value = "sqlite", value_parser = parse_broker)]
    broker: BrokerStorage,
    /// Measure the waiting room instead (docs/performance.md#the-waiting-room).
    #[arg(long)]
    waiting_room: bool,
}

fn parse_broker(name: &str) -> Result<BrokerStorage, String> {
    BrokerStorage::ALL
        .into_iter()
        .find(|b| b.name() == name)
        .ok_or_else(|| format!("sqlite or memory, not {name:?}"))
}

pub(crate) fn run(o: Args) -> anyhow::Result<()> {
    crate::setup::run()?;
    services::build()?;
    if o.waiting_room {
        return tokio::runtime::Runtime::new()?.block_on(bench_room(o));
    }
    let bare_proxy = services::build_example("gateway", "bare_proxy")?;
    tokio::runtime::Runtime::new()?.block_on(bench(o, &bare_proxy))
}

/// The accepted-order arms of a round and their places in its results (round `r` starts with
/// arm `(r - 1) % 3`).
const DIRECT: usize = 0;
const BARE: usize = 1;
const GATEWAY: usize = 2;
const ARMS: [&str; 3] = [
    "order-service: accepted (reserve + publish + ack)",
    "bare proxy -> order-service: accepted",
    "gateway -> order-service: accepted",
];

/// The private stack of a bench run, under `root`, with MariaDB sized for a load run.
async fn load_stack(broker: BrokerStorage, root: &Path) -> anyhow::Result<Stack> {
    Stack::start_with(StackOptions {
        storage: broker,
        root: Some(root.to_path_buf()),
        mysql_for_load: true,
        ..StackOptions::default()
    })
    .await
}

async fn bench(o: Args, bare_proxy: &Path) -> anyhow::Result<()> {
    let root = services::workspace_root().join("target/flash-sale");
    let mut stack = load_stack(o.broker, &root).await?;
    let info = stack.info().clone();
    let script = root.join("order.lua");
    std::fs::write(
        &script,
        WRK_SCRIPT.replace("CREATE_PATH", api::order::CREATE),
    )?;
    let mut runs = Vec::new();

    // Baseline: a bare axum handler, one Lua call per request, one multiplexed connection.
    let baseline = spawn_baseline(&info.redis_url()).await?;
    runs.push(wrk(
        &o,
        "baseline: bare axum + 1 Lua call",
        &baseline,
        &script,
        "1",
    )?);

    // order-service with sold-out detection per request in Redis (short-circuit off).
    let mut children: Vec<Child> = Vec::new();
    let (child, inventory) = services::start("inventory-service", &info, false)?;
    children.push(child);
    let admin = Admin::new(http_client(), &inventory.url(), LOCAL_ADMIN_TOKEN);
    admin.create_activity(1, 0).await?; // sold out from the start
    // Accepted-order runs, each on its own activity (wrk's users repeat from run to run), with
    // stock no run exhausts.
    let accepted_activities = (0..o.rounds * ARMS.len() as u32).map(|i| 10 + i64::from(i));
    for activity in accepted_activities.clone() {
        admin.create_activity(activity, ACCEPTED_STOCK).await?;
    }
    let no_short_circuit = [("FLASH_SALE_ORDER__SOLD_OUT_TTL_MS", "0".to_owned())];
    let (mut child, order) =
        services::start_with("order-service", &info, false, &no_short_circuit)?;
    runs.push(wrk(
        &o,
        "order-service: sold out, asking Redis",
        &order.url(),
        &script,
        "1",
    )?);
    services::stop(&mut child);

    let (child, order) = services::start("order-service", &info, false)?;
    let order_pid = child.id();
    children.push(child);
    runs.push(wrk(
        &o,
        "order-service: sold out, short-circuit",
        &order.url(),
        &script,
        "1",
    )?);

    // The gateway in front of the same order-service, every rule type on, with limits too high
    // to refuse anything: what is measured is the gateway's cost, not its throttling.
    let rules = root.join("bench-rules.toml");
    std::fs::write(&rules, BENCH_RULES)?;
    let gateway_env = [
        ("FLASH_SALE_UPSTREAMS__ORDER_SERVICE", order.url()),
        ("FLASH_SALE_UPSTREAMS__INVENTORY_SERVICE", inventory.url()),
        (
            "FLASH_SALE_AUTH__HS256_SECRET",
            services::LOCAL_JWT_SECRET.to_owned(),
        ),
        ("FLASH_SALE_AUTH__TRUST_BODY_USER_ID", "true".to_owned()),
        ("FLASH_SALE_RULES__FILE", rules.display().to_string()),
        // wrk's connections all come from 127.0.0.1: past the cap of 512 per address they would
        // be closed at once and reopened in a loop, and the arm would measure that churn (wrk
        // and the gateway spent 140 to 190 us per order on it), not the gateway's cost.
        (
            "FLASH_SALE_CONNECTIONS__MAX_CONNECTIONS_PER_IP",
            "0".to_owned(),
        ),
    ];
    let (child, gateway) = services::start_with("gateway", &info, false, &gateway_env)?;
    let gateway_pid = child.id();
    children.push(child);

    // The same order-service behind the least a proxy can do.
    let (child, bare) = start_bare_proxy(bare_proxy, &order.url(), &info.dir)?;
    let bare_pid = child.id();
    children.push(child);

    // Per round, the accepted rate of each arm. Per accepted run: its name, the CPU per accepted
    // order of every process of the path (from the start of the run until its orders were
    // written), and of the whole machine over the same time.
    let mut rounds = Vec::new();
    let mut cpu = Vec::new();
    let mut machine_rounds = Vec::new();
    let stores = Stores::connect(&info.database_url(), &info.redis_url()).await?;
    let mut activities = accepted_activities;
    let servers =
        [Server::Redis, Server::Broker, Server::Mysql].map(|server| stack.pid(server).unwrap_or(0));
    let pids = [
        order_pid,
        bare_pid,
        gateway_pid,
        servers[0],
        servers[1],
        servers[2],
    ];
    let urls = [order.url(), bare, gateway.url()];
    // The baseline once more at the start of every round: the machine's speed drifts by up to a
    // third within one run, and the arms' rates follow it. The baseline's own spread shows how
    // far the machine moved, and each arm's share of its round's baseline is printed beside its
    // rate (docs/performance.md, run M: the shares spread no less than the rates).
    let mut round_baselines = Vec::new();
    for round in 1..=o.rounds {
        let run = wrk(
            &o,
            &format!("baseline, round {round}"),
            &baseline,
            &script,
            "1",
        )?;
        round_baselines.push(run.requests_per_sec);
        runs.push(run);
        let mut rates = [0.0; ARMS.len()];
        let mut machine = [0.0; ARMS.len()];
        // Each round starts with the next arm, so none always runs first or last: whatever the
        // machine still does after a run (MariaDB flushing the orders just written) falls on
        // every arm in turn.
        let first = (round as usize - 1) % ARMS.len();
        for i in (0..ARMS.len()).map(|k| (first + k) % ARMS.len()) {
            let (arm, url) = (ARMS[i], &urls[i]);
            // Every earlier run's orders are in MySQL (waited for below): no run inherits a backlog.
            let activity = activities.next().context("one activity per run")?;
            let before = bill(&pids);
            let machine_before = machine_busy_seconds();
            let run = wrk(
                &o,
                &format!("{arm}, round {round}"),
                url,
                &script,
                &activity.to_string(),
            )?;
            let per_request = |seconds: f64| seconds * 1e6 / run.requests.max(1) as f64;
            let drain = stores
                .wait_for_drain(activity, Duration::from_secs(300))
                .await?;
            let after = bill(&pids);
            let process: [f64; PROCESSES.len()] =
                std::array::from_fn(|p| per_request(after[p] - before[p]));
            machine[i] = per_request(machine_busy_seconds() - machine_before);
            let answered_2xx = run.requests.saturating_sub(run.non_2xx_3xx);
            check_invariants(&stores, activity, ACCEPTED_STOCK, answered_2xx, &run.name).await?;
            cpu.push((run.name.clone(), process, machine[i], drain));
            rates[i] = run.requests_per_sec;
            runs.push(run);
        }
        rounds.push(rates);
        machine_rounds.push(machine);
    }
    // The baseline again: on this shared machine the rate drifts by up to a third within one
    // run, so the ratios are against the mean of the baseline's runs before and after the rounds.
    runs.push(wrk(
        &o,
        "baseline again, after the rounds",
        &baseline,
        &script,
        "1",
    )?);
    let baseline_after = runs.len() - 1;
    runs.push(wrk(
        &o,
        "gateway: sold out, short-circuit at the gateway",
        &gateway.url(),
        &script,
        "1",
    )?);
    // Activity 1 never had stock: the sold-out runs may not have ordered anything.
    stores.wait_for_drain(1, Duration::from_secs(60)).await?;
    check_invariants(&stores, 1, 0, 0, "the sold-out runs").await?;

    // What the answers of the runs on this instance were, as order-service counted them.
    let metrics = http_client()
        .get(format!("{}/metrics", order.management_url()))
        .send()
        .await?
        .text()
        .await?;
    println!("order-service outcomes (both runs on this instance):");
    for line in metrics.lines().filter(|l| {
        l.starts_with("flash_sale_orders_total")
            || l.starts_with("flash_sale_kafka_producer_resets_total")
    }) {
        println!("  {line}");
    }
    for (histogram, what) in [
        ("flash_sale_kafka_lot_size", "orders per broker record"),
        ("flash_sale_reserve_lot_size", "reservations per Redis call"),
        ("flash_sale_ack_lot_size", "acknowledgements per Redis call"),
    ] {
        let value = |suffix: &str| -> Option<f64> {
            let name = format!("{histogram}_{suffix} ");
            let line = metrics.lines().find(|l| l.starts_with(&name))?;
            line[name.len()..].trim().parse().ok()
        };
        if let (Some(sum), Some(count)) = (value("sum"), value("count")) {
            println!("  {what}: {:.1} on average", sum / count.max(1.0));
        }
    }

    let gateway_metrics = http_client()
        .get(format!("{}/metrics", gateway.management_url()))
        .send()
        .await?
        .text()
        .await?;
    println!("gateway calls to the shared Redis bucket (token leases):");
    for line in gateway_metrics
        .lines()
        .filter(|l| l.starts_with("gateway_cluster_leases_total"))
    {
        println!("  {line}");
    }

    for child in &mut children {
        services::stop(child);
    }
    drop(stack);

    let base = (runs[0].requests_per_sec + runs[baseline_after].requests_per_sec) / 2.0;
    println!(
        "\n{} s per run, {} connections, wrk -t2, broker log in {}, everything on this machine; \
         ratios are to the mean of the two baseline runs ({base:.0} requests/s)\n",
        o.seconds,
        o.connections,
        o.broker.name()
    );
    println!(
        "| run | requests/s | ratio to baseline | p50 ms | p99 ms | non-2xx/3xx | socket errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
            r.name,
            r.requests_per_sec,
            r.requests_per_sec / base,
            r.p50_ms,
            r.p99_ms,
            r.non_2xx_3xx,
            r.socket_errors
        );
    }
    let shares = |f: fn(&[f64; ARMS.len()]) -> f64| -> String {
        by_round_and_median(&rounds.iter().map(f).collect::<Vec<_>>())
    };
    println!("\naccepted orders, as a share of straight at order-service:");
    println!(
        "  through the bare proxy: {}",
        shares(|r| r[BARE] / r[DIRECT])
    );
    println!(
        "  through the gateway:    {}",
        shares(|r| r[GATEWAY] / r[DIRECT])
    );
    println!(
        "accepted orders through the gateway, as a share of through the bare proxy: {}",
        shares(|r| r[GATEWAY] / r[BARE])
    );

    println!(
        "\nCPU per accepted order, in microseconds, from the start of each run until its orders were in"
    );
    println!(
        "MySQL: each process's (user + system: /proc/<pid>/stat; wrk as this process's reaped child),"
    );
    println!(
        "their sum, the whole machine's over the same time (/proc/stat, steal excluded), and how long\n\
         the orders took to reach MySQL after the load stopped and a second of rest (drain):\n"
    );
    println!(
        "| run | {} | sum | machine | not in a process | drain s |",
        PROCESSES.join(" | ")
    );
    println!(
        "|---|{}---:|---:|---:|---:|",
        "---:|".repeat(PROCESSES.len())
    );
    for (name, process, machine_us, drain) in &cpu {
        let sum: f64 = process.iter().sum();
        let cells: Vec<String> = process.iter().map(|us| format!("{us:.1}")).collect();
        println!(
            "| {name} | {} | {sum:.1} | {machine_us:.1} | {:.1} | {:.1} |",
            cells.join(" | "),
            machine_us - sum,
            drain.as_secs_f64()
        );
    }
    println!("\naccepted orders per second by round, and the spread (max / min - 1) of each arm:");
    for (i, arm) in ARMS.iter().enumerate() {
        let rates: Vec<f64> = rounds.iter().map(|r| r[i]).collect();
        println!("  {arm}: {}", with_spread(&rates, 0));
    }
    println!(
        "  the baseline at the start of each round: {}",
        with_spread(&round_baselines, 0)
    );
    println!("the same as shares of their round's baseline:");
    for (i, arm) in ARMS.iter().enumerate() {
        let shares: Vec<f64> = rounds
            .iter()
            .zip(&round_baselines)
            .map(|(r, b)| r[i] / b)
            .collect();
        println!("  {arm}: {}", with_spread(&shares, 2));
    }
    let costs: Vec<f64> = machine_rounds
        .iter()
        .map(|m| m[DIRECT] / m[GATEWAY])
        .collect();
    println!(
        "\nmachine CPU per order straight at order-service, as a share of that through the gateway: {}",
        by_round_and_median(&costs)
    );
    let sold_out = runs.last().map_or(0.0, |r| r.requests_per_sec);
    println!(
        "\ngateway sold-out short circuit as a share of the bare handler: {:.2}",
        sold_out / base
    );
    println!(
        "\ninvariants 1-4 of docs/design.md held for every activity (no lost order by count: \
         at least one MySQL order per 2xx answer)"
    );
    Ok(())
}

/// `9083, 9202, 7940; spread 16 %` (max / min - 1), the values with `decimals`.
fn with_spread(values: &[f64], decimals: usize) -> String {
    let (min, max) = values.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(*v), hi.max(*v))
    });
    let shown: Vec<String> = values.iter().map(|v| format!("{v:.decimals$}")).collect();
    format!(
        "{}; spread {:.0} %",
        shown.join(", "),
        (max / min.max(1e-9) - 1.0) * 100.0
    )
}

/// `0.68, 0.70, 0.71 by round, median 0.70`.
fn by_round_and_median(values: &[f64]) -> String {
    let shown: Vec<String> = values.iter().map(|r| format!("{r:.2}")).collect();
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    };
    format!("{} by round, median {median:.2}", shown.join(", "))
}

/// Stock of each accepted-order activity: more than any run sells.
const ACCEPTED_STOCK: i64 = 10_000_000;

/// The invariants of docs/design.md for `activity` once its orders are settled: no oversell, no
/// duplicate and conservation as `cargo xtask sale` checks them, and no lost order by count (wrk
/// keeps no order numbers): MySQL holds at least one order per 2xx answer.
async fn check_invariants(
    stores: &Stores,
    activity: i64,
    initial_stock: i64,
    answered_2xx: u64,
    after: &str,
) -> anyhow::Result<()> {
    let report = stores
        .check_invariants(activity, initial_stock, &[])
        .await?;
    report.ensure().with_context(|| format!("after {after}"))?;
    ensure!(
        report.orders as u64 >= answered_2xx,
        "after {after}: {answered_2xx} answers were 2xx and MySQL holds {} orders",
        report.orders
    );
    Ok(())
}

/// CPU time the whole machine has spent working so far, in seconds: user, nice, system, irq and
/// softirq from `/proc/stat` (idle, iowait and steal are not work done here).
fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let field = |i: usize| ticks.get(i).copied().unwrap_or(0.0);
    (field(0) + field(1) + field(2) + field(5) + field(6)) / 100.0
}

/// Every rule type of the gateway, with limits no run reaches.
const BENCH_RULES: &str = r#"
[[flow]]
resource = "flash-sale-order"
grade = "qps"
count = 10000000
control = "reject"

[[flow]]
resource = "flash-sale-order"
grade = "concurrency"
count = 100000

[[param]]
resource = "flash-sale-order"
param = "user"
count = 1000
window_secs = 1
burst = 0
max_keys = 10000000

[system]
adaptive = true
cpu_gate = 0.8
min_in_flight = 100000
window_ms = 10000
buckets = 100

[[cluster]]
resource = "flash-sale-order"
replenish_rate = 10000000
burst_capacity = 20000000
requested_tokens = 1
"#;

/// wrk's request generator: the seed's body with a new user per request (`CREATE_PATH` is
/// replaced by the route).
const WRK_SCRIPT: &str = r#"
-- Every wrk thread runs its own copy of this script with the same random seed, so users are
-- numbered per thread instead of drawn at random: no two requests share a user.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local activity = os.getenv("ACTIVITY") or "1"
local counter = 0
request = function()
  counter = counter + 1
  local body = string.format('{"userId":"%d","activityId":"%s","quantity":1}', tid * 1000000000 + counter, activity)
  return wrk.format("POST", "CREATE_PATH", {["Content-Type"] = "application/json"}, body)
end
"#;

fn wrk(
    o: &Args,
    name: &str,
    base_url: &str,
    script: &std::path::Path,
    activity: &str,
) -> anyhow::Result<Run> {
    println!("running: {name}");
    let out = Command::new("wrk")
        .args(["-t2", "--latency", "--timeout", "5s"])
        .arg(format!("-c{}", o.connections))
        .arg(format!("-d{}s", o.seconds))
        .arg("-s")
        .arg(script)
        .arg(base_url)
        .env("ACTIVITY", activity)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let number_after = |key: &str| -> Option<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| {
                l.split_whitespace()
                    .nth(key.split_whitespace().count())
                    .map(str::to_owned)
            })
    };
    let rps: f64 = number_after("Requests/sec:")
        .with_context(|| format!("wrk printed no Requests/sec:\n{text}"))?
        .parse()?;
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let ms = |v: Option<String>| v.map_or(0.0, |s| parse_duration_ms(&s));
    let non_ok = number_after("Non-2xx or 3xx responses:").map_or(0, |s| s.parse().unwrap_or(0));
    let socket_errors = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("Socket errors:"))
        .map_or(0, |rest| {
            rest.split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        });
    std::thread::sleep(Duration::from_secs(1));
    Ok(Run {
        name: name.to_owned(),
        requests,
        requests_per_sec: rps,
        p50_ms: ms(number_after("50%")),
        p99_ms: ms(number_after("99%")),
        non_2xx_3xx: non_ok,
        socket_errors,
    })
}

/// Starts the bare proxy in front of `upstream` on a free port, logging to `<dir>/bare-proxy.log`;
/// its URL once it accepts connections.
fn start_bare_proxy(binary: &Path, upstream: &str, dir: &Path) -> anyhow::Result<(Child, String)> {
    let address = format!("127.0.0.1:{}", free_port()?);
    let log_path = dir.join("bare-proxy.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = Command::new(binary)
        .env("BARE_PROXY_LISTEN", &address)
        .env("BARE_PROXY_UPSTREAM", upstream)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let listening = || std::net::TcpStream::connect(&address).is_ok();
    if let Err(error) = services::wait_ready(
        &mut child,
        "the bare proxy",
        &log_path,
        Duration::from_secs(30),
        listening,
    ) {
        services::stop(&mut child);
        return Err(error);
    }
    Ok((child, format!("http://{address}")))
}

/// The processes of the bill, in the order of [`bill`]'s values.
const PROCESSES: [&str; 8] = [
    "order-service",
    "bare proxy",
    "gateway",
    "Redis",
    "broker",
    "MariaDB",
    "wrk",
    "xtask",
];

/// CPU seconds so far of each of `pids` (order-service, bare proxy, gateway, Redis, broker,
/// MariaDB), then of the reaped children of this process (wrk: the only child that ends during
/// a run), then of this process itself (the drain checks).
fn bill(pids: &[u32; 6]) -> [f64; PROCESSES.len()] {
    let own = stat_fields(std::process::id());
    let ticks = |i: usize| own.get(i).copied().unwrap_or(0.0) / 100.0;
    std::array::from_fn(|i| match i {
        0..6 => cpu_seconds(pids[i]),
        6 => ticks(13) + ticks(14),
        _ => ticks(11) + ticks(12),
    })
}

/// The numeric fields of `/proc/<pid>/stat` after the command name (which may hold spaces),
/// from the state on (unparsable ones as 0); empty if it cannot be read.
fn stat_fields(pid: u32) -> Vec<f64> {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Vec::new();
    };
    stat.rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0))
        .collect()
}

/// CPU time (user + system) the process has used so far, in seconds; 0 if it cannot be read.
/// Linux's `/proc/<pid>/stat` counts it in clock ticks of 1/100 s.
fn cpu_seconds(pid: u32) -> f64 {
    // After the command name: utime is the 12th field, stime the 13th.
    let fields = stat_fields(pid);
    let ticks = |i: usize| fields.get(i).copied().unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn parse_duration_ms(s: &str) -> f64 {
    let (num, factor) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().unwrap_or(0.0) * factor
}

/// The baseline server, in this process: parse the JSON body, one EVALSHA, answer 409.
async fn spawn_baseline(redis_url: &str) -> anyhow::Result<String> {
    let client = redis::Client::open(redis_url)?;
    let conn = client.get_multiplexed_async_connection().await?;
    let script = redis::Script::new("return redis.call('EXISTS', KEYS[1])");
    let app = Router::new().route(
        api::order::CREATE,
        post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let mut conn = conn.clone();
            let script = script.clone();
            async move {
                // The keys as the buy path builds them (an unknown activity: a key never set).
                let key = ActivityId::parse(body.get("activityId"))
                    .map(|activity| ActivityKeys::new(activity).meta)
                    .unwrap_or_default();
                let n: i64 = script.key(key).invoke_async(&mut conn).await.unwrap_or(-1);
                (
                    axum::http::StatusCode::CONFLICT,
                    axum::Json(serde_json::json!({"code": ErrorCode::SoldOut.as_str(), "message": n.to_string()})),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// The waiting room's admission rate in the bench (buyers a second).
const ROOM_RATE: u32 = 200;

/// `cargo xtask bench --waiting-room` (docs/performance.md#the-waiting-room): in one run, the
/// bare one-Lua-call handler (the baseline), then the gateway's waiting room under a flood of
/// joins (wrk: every request a new buyer), the baseline again, and buyers who arrive at ten
/// times the admission rate and buy with their passes. It reports the room's answer rate
/// against the mean of the two baseline runs,
/// the admissions against the rate, order-service's busiest second of accepted orders
/// against the rate (from the orders' reservation instants in MySQL), and the share of buyers
/// admitted out of arrival order.
async fn bench_room(o: Args) -> anyhow::Result<()> {
    let root = services::workspace_root().join("target/flash-sale");
    let stack = load_stack(o.broker, &root).await?;
    let info = stack.info().clone();
    let baseline_script = root.join("order.lua");
    std::fs::write(
        &baseline_script,
        WRK_SCRIPT.replace("CREATE_PATH", api::order::CREATE),
    )?;
    let baseline = spawn_baseline(&info.redis_url()).await?;
    let base = wrk(
        &o,
        "baseline: bare axum + 1 Lua call",
        &baseline,
        &baseline_script,
        "1",
    )?;

    let mut children: Vec<Child> = Vec::new();
    let (child, inventory) = services::start("inventory-service", &info, false)?;
    children.push(child);
    let (child, order) = services::start("order-service", &info, false)?;
    children.push(child);
    let admin = Admin::new(http_client(), &inventory.url(), LOCAL_ADMIN_TOKEN);
    // 2: the join flood; 3: the buyers.
    for activity in [2, 3] {
        admin.create_activity(activity, ACCEPTED_STOCK).await?;
    }
    let rules = root.join("bench-room-rules.toml");
    std::fs::write(
        &rules,
        format!("{BENCH_RULES}\n[[waiting_room]]\nrate = {ROOM_RATE}\nburst = 0\n"),
    )?;
    let mut launch = services::gateway_launch(&order, &inventory)?;
    launch.env.extend([
        (
            "FLASH_SALE_RULES__FILE".to_owned(),
            rules.display().to_string(),
        ),
        // As in the accepted-order arms: wrk's connections all come from 127.0.0.1.
        (
            "FLASH_SALE_CONNECTIONS__MAX_CONNECTIONS_PER_IP".to_owned(),
            "0".to_owned(),
        ),
    ]);
    let (child, gateway) = launch.start(&info, false)?;
    children.push(child);
    let http = http_client();
    let room_state = |activity: i64| {
        let http = http.clone();
        let url = format!("{}/waiting-room/{activity}", gateway.management_url());
        async move {
            let view: serde_json::Value = http.get(&url).send().await?.json().await?;
            anyhow::Ok(view)
        }
    };
    // The gateway reaches Redis in the background.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while room_state(2).await.is_err() || room_state(2).await?["waiting"].is_null() {
        ensure!(
            std::time::Instant::now() < deadline,
            "the gateway never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The flood: every request a new buyer joining activity 2's room.
    let join_script = root.join("join.lua");
    std::fs::write(
        &join_script,
        WRK_SCRIPT.replace("CREATE_PATH", "/api/admission/2"),
    )?;
    let flood_started = std::time::Instant::now();
    let flood = wrk(
        &o,
        "gateway: waiting room joins",
        &gateway.url(),
        &join_script,
        "2",
    )?;
    let flood_secs = flood_started.elapsed().as_secs_f64() - 1.0; // wrk() sleeps 1 s after
    let view = room_state(2).await?;
    let admitted_in_flood = view["outstanding"].as_u64().unwrap_or(0);
    // The baseline again, now that the flood is over: on a shared machine the rate drifts
    // within a run, and the mean of a run before and a run after the flood cancels a steady
    // drift where one run before it does not.
    let base_after = wrk(
        &o,
        "baseline again, after the flood",
        &baseline,
        &baseline_script,
        "1",
    )?;
    let base_rate = (base.requests_per_sec + base_after.requests_per_sec) / 2.0;

    // Buyers at ten times the rate: ten seconds' worth of admissions arrive within the first
    // second, wait their turn, and buy.
    let buyers = (ROOM_RATE * 10) as usize;
    let config = SaleConfig {
        activity: 3,
        stock: ACCEPTED_STOCK,
        requests: buyers,
        concurrency: buyers,
        repeat_every: 0,
        first_user: 1,
        retry_ms: 30_000,
    };
    let clients = flash_sale_tests::apps::buyer_clients(8)?;
    let progress = std::sync::Arc::new(LoadProgress::default());
    let (load, figures) =
        drive_room_sale(&clients, &gateway.url(), &config, ROOM_RATE, &progress).await;
    let stores = Stores::connect(&info.database_url(), &info.redis_url()).await?;
    stores.wait_for_drain(3, Duration::from_secs(120)).await?;
    let report = stores
        .check_invariants(3, ACCEPTED_STOCK, &load.accepted)
        .await?;
    let peak_intake = peak_per_second(&stores.reserved_at_ms(3).await?);
    for child in &mut children {
        services::stop(child);
    }
    drop(stack);

    println!("\n{figures}");
    println!("| run | requests/s | vs baseline | P50 ms | P99 ms | non-2xx |");
    println!("|---|---:|---:|---:|---:|---:|");
    for run in [&base, &flood, &base_after] {
        println!(
            "| {} | {:.0} | {:.2} | {:.1} | {:.1} | {} |",
            run.name,
            run.requests_per_sec,
            run.requests_per_sec / base_rate,
            run.p50_ms,
            run.p99_ms,
            run.non_2xx_3xx
        );
    }
    // Only a 200 is a queued buyer's answer; the rest are the room's 503s (Redis not in time).
    let queued = flood.requests.saturating_sub(flood.non_2xx_3xx);
    let queued_rate = queued as f64 / flood_secs;
    println!(
        "\njoin flood: {} joins in {flood_secs:.1} s, {queued} answered 200 (queued or admitted): {queued_rate:.0}/s, {:.2} of the baseline (the mean of the runs before and after, {base_rate:.0}/s); {admitted_in_flood} admitted: {:.3} of the rate ({ROOM_RATE}/s)",
        flood.requests,
        queued_rate / base_rate,
        admitted_in_flood as f64 / (f64::from(ROOM_RATE) * flood_secs)
    );
    println!(
        "buyers at 10x the rate: {} buyers, {} orders; order-service's busiest second accepted {peak_intake}: {:.3} of the rate; admitted out of arrival order (50 ms): {:.2} %",
        buyers,
        load.accepted.len(),
        peak_intake as f64 / f64::from(ROOM_RATE),
        figures.out_of_order_share * 100.0
    );
    println!("invariants\n{report}");
    report.ensure()?;
    ensure!(
        load.accepted.len() == buyers,
        "{} of {buyers} buyers bought",
        load.accepted.len()
    );
    Ok(())
}
