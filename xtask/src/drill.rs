//! `cargo xtask drill`: the crash drills. For each part of the system, a sale through the gateway
//! with buyers who retry on errors as people do, a SIGKILL of that part's process once a third of
//! the stock is sold, a restart of the same binary with the same settings and ports two seconds
//! later (what a supervisor does), then the drain and the reconciler, and invariants 1-5 of
//! docs/design.md read from MySQL and Redis directly. One table at the end; any lost, duplicated
//! or oversold order, a broken conservation or a bad input that changed something fails the run.
//!
//! `hostile` kills nothing: buyers keep buying while one address floods the gateway with slow
//! heads and idle connections (`hostile.rs`).
//!
//! `order-service-pair` runs two order-service processes (the gateway in front of the first),
//! kills the second and does not restart it: the survivor's consumer must take over the dead
//! member's partitions once the broker expires its session.

use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use flash_sale_common::api;
use flash_sale_tests::apps::http_client;
use flash_sale_tests::scenario::{
    Admin, InvariantReport, LoadReport, SaleConfig, Stores, drive_sale,
};
use flash_sale_tests::stack::{BrokerStorage, Server, Stack};
use serde_json::{Value, json};

use crate::services::{self, LOCAL_ADMIN_TOKEN, Launch, ServiceInfo};

/// What a drill kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    OrderService,
    InventoryService,
    Gateway,
    Redis,
    /// Redis killed and restarted from a copy of its files a second old (a lost last second).
    RedisLoss,
    Broker,
    Mariadb,
    OrderServicePair,
    /// Nothing killed: one address floods the gateway with slow heads and idle connections
    /// while buyers from another keep buying (`hostile.rs`).
    Hostile,
}

impl Part {
    const ALL: [Part; 9] = [
        Part::OrderService,
        Part::InventoryService,
        Part::Gateway,
        Part::Redis,
        Part::RedisLoss,
        Part::Broker,
        Part::Mariadb,
        Part::OrderServicePair,
        Part::Hostile,
    ];

    const fn name(self) -> &'static str {
        match self {
            Part::OrderService => "order-service",
            Part::InventoryService => "inventory-service",
            Part::Gateway => "gateway",
            Part::Redis => "redis",
            Part::RedisLoss => "redis-loss",
            Part::Broker => "broker",
            Part::Mariadb => "mariadb",
            Part::OrderServicePair => "order-service-pair",
            Part::Hostile => "hostile",
        }
    }

    fn parse(name: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .with_context(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|p| p.name()).collect();
                format!("unknown part {name:?}; one of {}", names.join(", "))
            })
    }

    /// The stack's server behind this part, for the parts that are servers.
    const fn server(self) -> Option<Server> {
        match self {
            Part::Redis | Part::RedisLoss => Some(Server::Redis),
            Part::Broker => Some(Server::Broker),
            Part::Mariadb => Some(Server::Mysql),
            _ => None,
        }
    }
}

/// The shape of one drill's sale.
#[derive(Debug, Clone, Copy)]
struct Size {
    stock: i64,
    buyers: usize,
    concurrency: usize,
}

/// The operator's drill (docs/drills.md): 1,500 items, 6,000 buyers.
const FULL: Size = Size {
    stock: 1500,
    buyers: 6000,
    concurrency: 200,
};

/// The CI form (`--short`): the same drills on a smaller sale.
const SHORT: Size = Size {
    stock: 400,
    buyers: 1600,
    concurrency: 80,
};

/// How long a killed part stays down before its restart.
const DOWN_FOR: Duration = Duration::from_secs(2);

/// The most `redis-loss` loses of Redis' writes: `appendfsync everysec`'s window.
const LOST_WRITES: Duration = Duration::from_secs(1);

/// How long a buyer goes on retrying (longer than any part's way back).
const BUYER_PATIENCE: Duration = Duration::from_secs(60);

/// How long the drain may take after the load before the drill counts what is missing.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// Settings that make the reconciler act within a drill: a pass every 2 s, and reservations the
/// broker never acknowledged released after 15 s (three times the producer's 5 s timeout).
const RECONCILER_ENV: [(&str, &str); 2] = [
    ("FLASH_SALE_INVENTORY__RECONCILE_INTERVAL_SECS", "2"),
    ("FLASH_SALE_INVENTORY__RESERVATION_DEADLINE_SECS", "15"),
];

/// `cargo xtask drill`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Drill only this part (repeatable): order-service, inventory-service, gateway, redis,
    /// redis-loss, broker, mariadb, order-service-pair, hostile. Default: every part.
    #[arg(long = "part", value_name = "NAME", value_parser = |name: &str| Part::parse(name).map_err(|e| e.to_string()))]
    parts: Vec<Part>,
    /// The CI's smaller sale.
    #[arg(long)]
    short: bool,
}

impl Args {
    /// Every part, on the CI's smaller sale (`cargo xtask ci`).
    pub(crate) fn short() -> Self {
        Self {
            parts: Vec::new(),
            short: true,
        }
    }
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let size = if args.short { SHORT } else { FULL };
    let parts = if args.parts.is_empty() {
        Part::ALL.to_vec()
    } else {
        args.parts
    };
    crate::setup::run()?;
    services::build()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let rows = runtime.block_on(async {
        let mut rows = Vec::new();
        for part in parts {
            let what = if part == Part::Hostile {
                "a quiet sale, then the same under a slow-header and connection flood from one address"
            } else {
                "SIGKILL once a third is sold"
            };
            println!(
                "\ndrill {}: {} items, {} buyers ({} at a time), {what}",
                part.name(),
                size.stock,
                size.buyers,
                size.concurrency
            );
            let row = drill(part, size)
                .await
                .with_context(|| format!("drill {}", part.name()))?;
            println!("{}", row.report);
            rows.push(row);
        }
        anyhow::Ok(rows)
    })?;
    println!("\n{}", table(&rows));
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.part)
        .collect();
    println!(
        "drills: {} passed, {} failed",
        rows.len() - failed.len(),
        failed.len()
    );
    ensure!(failed.is_empty(), "drills failed: {}", failed.join(", "));
    Ok(())
}

/// One drill's outcome.
struct Row {
    part: &'static str,
    report: InvariantReport,
    /// Seconds from the restart until the first 2xx (none: no 2xx came after it).
    first_2xx: Option<f64>,
    /// Seconds from the restart (the kill, for a part not restarted) until nothing was pending.
    drained: Option<f64>,
    /// Invariant 5: bad input answered 4xx with a code and changed nothing.
    bad_input: Result<(), String>,
    /// The hostile drill's latency verdict (`hostile::latency_verdict`).
    latency: Option<Result<String, String>>,
}

impl Row {
    fn oversold(&self) -> i64 {
        (self.report.ordered - self.report.initial_stock).max(0)
    }

    fn passed(&self) -> bool {
        self.report.all_hold()
            && self.bad_input.is_ok()
            && self.drained.is_some()
            && self.latency.as_ref().is_none_or(Result::is_ok)
    }
}

fn table(rows: &[Row]) -> String {
    let seconds = |s: Option<f64>| s.map_or_else(|| "-".to_owned(), |s| format!("{s:.1}"));
    let mut out = format!(
        "| {:<18} | {:>8} | {:>8} | {:>4} | {:>10} | {:>8} | {:>18} | {:>17} | {:<6} |\n|{}|\n",
        "part",
        "accepted",
        "in MySQL",
        "lost",
        "duplicated",
        "oversold",
        "first 2xx after, s",
        "drained after, s",
        "result",
        ["---"; 9].join("|")
    );
    for r in rows {
        out.push_str(&format!(
            "| {:<18} | {:>8} | {:>8} | {:>4} | {:>10} | {:>8} | {:>18} | {:>17} | {:<6} |\n",
            r.part,
            r.report.accepted,
            r.report.accepted - r.report.missing.len(),
            r.report.missing.len(),
            r.report.duplicate_users,
            r.oversold(),
            seconds(r.first_2xx),
            seconds(r.drained),
            if r.passed() { "ok" } else { "FAIL" }
        ));
        if let Err(e) = &r.bad_input {
            out.push_str(&format!("  {}: bad input: {e}\n", r.part));
        }
        match &r.latency {
            Some(Ok(line)) => out.push_str(&format!("  {}: {line}\n", r.part)),
            Some(Err(line)) => out.push_str(&format!("  {}: FAIL {line}\n", r.part)),
            None => {}
        }
    }
    out
}

/// One service process and how to start it again.
struct Process {
    launch: Launch,
    child: Child,
    info: ServiceInfo,
}

impl Process {
    fn start(launch: Launch, stack: &Stack) -> anyhow::Result<Self> {
        let (child, info) = launch.start(stack.info(), false)?;
        Ok(Self {
            launch,
            child,
            info,
        })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self, stack: &Stack) -> anyhow::Result<()> {
        let (child, info) = self.launch.start(stack.info(), false)?;
        self.child = child;
        self.info = info;
        Ok(())
    }
}

/// The whole system on a private stack: order-service, inventory-service, the gateway in front
/// of them and, for the pair drill, a second order-service.
struct System {
    stack: Stack,
    order: Process,
    inventory: Process,
    gateway: Process,
    second_order: Option<Process>,
}

impl System {
    async fn start(pair: bool) -> anyhow::Result<Self> {
        let root = services::workspace_root().join("target/flash-sale/drills");
        let stack = Stack::start_in(BrokerStorage::Sqlite, Some(&root), false).await?;
        let order = Process::start(Launch::new("order-service", &[])?, &stack)?;
        let reconciler: Vec<(&str, String)> = RECONCILER_ENV
            .iter()
            .map(|(k, v)| (*k, (*v).to_owned()))
            .collect();
        let inventory = Process::start(Launch::new("inventory-service", &reconciler)?, &stack)?;
        let gateway = Process::start(
            services::gateway_launch(&order.info, &inventory.info)?,
            &stack,
        )?;
        let second_order = if pair {
            let mut launch = Launch::new("order-service", &[])?;
            launch.label = "order-service-b".to_owned();
            Some(Process::start(launch, &stack)?)
        } else {
            None
        };
        Ok(Self {
            stack,
            order,
            inventory,
            gateway,
            second_order,
        })
    }

    fn process(&mut self, part: Part) -> Option<&mut Process> {
        match part {
            Part::OrderService => Some(&mut self.order),
            Part::InventoryService => Some(&mut self.inventory),
            Part::Gateway => Some(&mut self.gateway),
            Part::OrderServicePair => self.second_order.as_mut(),
            Part::Redis | Part::RedisLoss | Part::Broker | Part::Mariadb | Part::Hostile => None,
        }
    }

    fn kill(&mut self, part: Part) {
        match part.server() {
            Some(server) => self.stack.kill(server),
            None => {
                if let Some(p) = self.process(part) {
                    p.kill();
                }
            }
        }
    }

    fn restart(&mut self, part: Part) -> anyhow::Result<()> {
        if let Some(server) = part.server() {
            return self.stack.restart(server);
        }
        let stack = &self.stack;
        let process = match part {
            Part::OrderService => &mut self.order,
            Part::InventoryService => &mut self.inventory,
            Part::Gateway => &mut self.gateway,
            _ => bail!("{} is not restarted", part.name()),
        };
        process.restart(stack)
    }

    fn stop(mut self) {
        for p in [
            Some(&mut self.gateway),
            self.second_order.as_mut(),
            Some(&mut self.order),
            Some(&mut self.inventory),
        ]
        .into_iter()
        .flatten()
        {
            services::stop(&mut p.child);
        }
        drop(self.stack);
    }

    async fn stores(&self) -> anyhow::Result<Stores> {
        let info = self.stack.info();
        Stores::connect(&info.database_url(), &info.redis_url()).await
    }
}

async fn drill(part: Part, size: Size) -> anyhow::Result<Row> {
    let mut system = System::start(part == Part::OrderServicePair).await?;
    let result = if part == Part::Hostile {
        run_hostile(&mut system, size).await
    } else {
        run_drill(&mut system, part, size).await
    };
    if !result.as_ref().is_ok_and(Row::passed) {
        keep_logs(&system.stack.info().dir, part)?;
    }
    system.stop();
    result
}

/// Copies a failed drill's logs out of the stack's directory, which is removed with the stack.
fn keep_logs(dir: &std::path::Path, part: Part) -> anyhow::Result<()> {
    let kept = services::workspace_root()
        .join("target/flash-sale/drill-logs")
        .join(part.name());
    std::fs::create_dir_all(&kept)?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "log") {
            std::fs::copy(&path, kept.join(path.file_name().unwrap_or_default()))?;
        }
    }
    println!("  logs kept in {}", kept.display());
    Ok(())
}

async fn run_drill(system: &mut System, part: Part, size: Size) -> anyhow::Result<Row> {
    const ACTIVITY: i64 = 1;
    let http = http_client();
    Admin::new(
        http.clone(),
        &system.inventory.info.url(),
        LOCAL_ADMIN_TOKEN,
    )
    .create_activity(ACTIVITY, size.stock)
    .await?;
    let config = SaleConfig {
        activity: ACTIVITY,
        stock: size.stock,
        requests: size.buyers,
        concurrency: size.concurrency,
        repeat_every: 0,
        first_user: 1,
        retry_ms: BUYER_PATIENCE.as_millis() as u64,
    };
    let gateway_url = system.gateway.info.url();
    let load = {
        let (http, config) = (http.clone(), config.clone());
        tokio::spawn(async move { drive_sale(&http, &gateway_url, &config).await })
    };

    let stores = system.stores().await?;
    let copied_at = if part == Part::RedisLoss {
        // The copy is taken a sixth into the sale and the kill comes a sixth later (a second
        // at most): the writes between are what `appendfsync everysec` may lose.
        wait_until_sold(&stores, ACTIVITY, size.stock / 6, &load).await?;
        system.stack.copy_redis_data()?;
        let copied_at = Instant::now();
        tokio::time::timeout(
            LOST_WRITES,
            wait_until_sold(&stores, ACTIVITY, size.stock / 6, &load),
        )
        .await
        .unwrap_or(Ok(()))?;
        Some(copied_at)
    } else {
        wait_until_sold(&stores, ACTIVITY, size.stock / 3, &load).await?;
        None
    };
    system.kill(part);
    let killed_at = Instant::now();
    println!("  killed {} (SIGKILL)", part.name());
    if let Some(copied_at) = copied_at {
        system.stack.restore_redis_copy()?;
        println!(
            "  put back the copy of Redis' files taken {:.2} s before the kill",
            killed_at.duration_since(copied_at).as_secs_f64()
        );
    }
    let restarted = part != Part::OrderServicePair;
    let back_at = if !restarted {
        killed_at
    } else {
        tokio::time::sleep(DOWN_FOR).await;
        let restarting = Instant::now();
        system.restart(part)?;
        println!(
            "  restarted {} ({:.1} s to ready)",
            part.name(),
            restarting.elapsed().as_secs_f64()
        );
        restarting
    };

    let load: LoadReport = load.await.context("the load task")?;
    println!("{load}");
    let first_2xx = load
        .accepted_at
        .iter()
        .filter(|t| restarted && **t >= back_at)
        .min()
        .map(|t| t.duration_since(back_at).as_secs_f64());

    let stores = system.stores().await?;
    // The same wait as the main job's: nothing pending and the counters verified.
    let drained = match stores.wait_for_drain(ACTIVITY, DRAIN_LIMIT).await {
        Ok(_) => Some(back_at.elapsed().as_secs_f64()),
        Err(error) => {
            println!("  {error:#}");
            None
        }
    };
    let report = stores
        .check_invariants(ACTIVITY, size.stock, &load.accepted)
        .await?;
    let bad_input = bad_input_changes_nothing(&http, &system.gateway.info.url(), &stores, ACTIVITY)
        .await
        .map_err(|e| format!("{e:#}"));
    Ok(Row {
        part: part.name(),
        report,
        first_2xx,
        drained,
        bad_input,
        latency: None,
    })
}

/// The hostile drill: a quiet sale, then the same sale under attack (`hostile.rs`).
async fn run_hostile(system: &mut System, size: Size) -> anyhow::Result<Row> {
    let admin = Admin::new(
        http_client(),
        &system.inventory.info.url(),
        LOCAL_ADMIN_TOKEN,
    );
    for activity in [1, 2, 3] {
        admin.create_activity(activity, size.stock).await?;
    }
    // Sixteen times the crash drills' buyers: each sale lasts about two seconds, so its P99 is
    // over tens of thousands of answers and not at the mercy of one scheduling hiccup.
    let config = |activity, first_user| SaleConfig {
        activity,
        stock: size.stock,
        requests: size.buyers * 16,
        concurrency: size.concurrency,
        repeat_every: 0,
        first_user,
        retry_ms: 0,
    };
    let (quiet, loud, attack) = crate::hostile::sales(&system.gateway.info.url(), config).await?;
    println!(
        "quiet sale (buyers from {})\n{quiet}",
        crate::hostile::BUYERS
    );
    println!(
        "under attack: {} connections opened from one address, {} closed by the gateway, {} refused by the kernel\n{loud}",
        attack.opened, attack.closed_by_gateway, attack.failed_to_connect
    );
    let stores = system.stores().await?;
    crate::hostile::quiet_invariants(&stores, size.stock, &quiet).await?;
    let started = Instant::now();
    let drained = stores
        .wait_for_drain(3, DRAIN_LIMIT)
        .await
        .map(|_| started.elapsed().as_secs_f64())
        .map_err(|error| println!("  {error:#}"))
        .ok();
    let report = stores
        .check_invariants(3, size.stock, &loud.accepted)
        .await?;
    let bad_input =
        bad_input_changes_nothing(&http_client(), &system.gateway.info.url(), &stores, 3)
            .await
            .map_err(|e| format!("{e:#}"));
    Ok(Row {
        part: Part::Hostile.name(),
        report,
        first_2xx: None,
        drained,
        bad_input,
        latency: Some(crate::hostile::latency_verdict(&quiet, &loud, &attack)),
    })
}

/// Waits until `sold` items are gone from Redis' stock (the moment of the kill).
async fn wait_until_sold(
    stores: &Stores,
    activity: i64,
    sold: i64,
    load: &tokio::task::JoinHandle<LoadReport>,
) -> anyhow::Result<()> {
    let stock = stores.redis_stock(activity).await?;
    let target = stock - sold;
    loop {
        if stores.redis_stock(activity).await? <= target {
            return Ok(());
        }
        ensure!(
            !load.is_finished(),
            "the load ended before {sold} items were sold"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Invariant 5 through the gateway: each bad request gets a 4xx JSON error with a code and a
/// message, and neither MySQL's orders nor Redis' stock move.
async fn bad_input_changes_nothing(
    http: &reqwest::Client,
    gateway: &str,
    stores: &Stores,
    activity: i64,
) -> anyhow::Result<()> {
    let url = format!("{gateway}{}", api::order::CREATE);
    let before = (
        stores.order_count(activity).await?,
        stores.redis_stock(activity).await?,
    );
    let user = "999999999";
    let bodies = [
        json!({"userId": user, "activityId": activity.to_string(), "quantity": 0}).to_string(),
        json!({"userId": user, "activityId": activity.to_string(), "quantity": -3}).to_string(),
        json!({"userId": user, "activityId": "not-a-number", "quantity": 1}).to_string(),
        r#"{"userId": "999999999", "activityId": "1", "quantity": 1"#.to_owned(),
    ];
    for body in bodies {
        let res = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        let status = res.status();
        let answer: Value = res.json().await.unwrap_or(Value::Null);
        ensure!(
            status.is_client_error() && answer["code"].is_string() && answer["message"].is_string(),
            "{body} was answered {status} {answer}"
        );
    }
    let after = (
        stores.order_count(activity).await?,
        stores.redis_stock(activity).await?,
    );
    ensure!(
        before == after,
        "bad input changed (orders, stock) from {before:?} to {after:?}"
    );
    Ok(())
}
