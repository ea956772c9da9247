//! The main job: a local flash sale, end to end, with its report.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flash_sale_common::api;
use flash_sale_tests::admission::drive_room_sale;
use flash_sale_tests::apps::{buyer_clients, http_client};
use flash_sale_tests::browser;
use flash_sale_tests::payments::PaymentSimulator;
use flash_sale_tests::report::{Phase, RunReport, Sampler};
use flash_sale_tests::scenario::{
    Admin, LoadProgress, LoadReport, SaleConfig, Stores, after_the_sale, drive_sale_with,
};
use flash_sale_tests::stack::{BrokerStorage, Stack, StackOptions};

use crate::live::Live;
use crate::services::{self, LOCAL_ADMIN_TOKEN, LOCAL_PAYMENT_SECRET};

struct Options {
    sale: SaleConfig,
    hey: bool,
    compare_wrk: bool,
    pay_timeout_secs: i64,
    direct: bool,
    redis_cluster: bool,
    /// The waiting room's admission rate, with `--waiting-room`.
    waiting_room: Option<u32>,
}

/// How long a buyer refused with a 429 or a 5xx goes on trying, as people do: the gateway meters
/// the flood (the seed's cluster-wide 1,000 requests/s), so a buyer turned away tries again.
const BUYER_PATIENCE_MS: u64 = 60_000;

/// Loopback addresses the buyers come from (127.0.1.1 and on): 1,000 buyers at once from one
/// address would pass the gateway's cap of 512 connections per address, which is there for
/// exactly that; 8 addresses hold 125 each.
const BUYER_ADDRESSES: u8 = 8;

/// The price of one item in the local sale, in cents.
const PRICE_CENTS: i64 = 1999;

/// `cargo xtask sale`: defaults are the seed's load test (100,000 requests, 1,000 at a time,
/// for 10,000 items).
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Create-order requests to send.
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    /// Items on sale.
    #[arg(long, default_value_t = 10_000)]
    stock: i64,
    /// Also run the seed's `hey` command against the stack.
    #[arg(long)]
    hey: bool,
    /// After the sale, compare the load tool's latency with wrk's on the sold-out path, in the
    /// same run (where the tail comes from: docs/performance.md).
    #[arg(long)]
    compare_wrk: bool,
    /// Seconds a buyer has to pay (15 minutes in a real sale; short here, so the unpaid orders
    /// expire and their stock sells again while you watch). It counts from each order's arrival
    /// in MySQL, so it must outlast the sale: the gateway meters it to about 1,000 a second.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(i64).range(1..=3600))]
    pay_timeout_secs: i64,
    /// Send the buyers straight to order-service instead of through the gateway (each sends
    /// once, as before the gateway was on the main job's path).
    #[arg(long)]
    direct: bool,
    /// Run the services on a three-master Redis Cluster (formed by the bundle's
    /// `k8s/redis/bootstrap.sh`, the services in `redis.cluster` mode) instead of one Redis.
    #[arg(long)]
    redis_cluster: bool,
    /// Put the sale behind the gateway's waiting room (docs/waiting-room.md): each buyer joins,
    /// waits their turn, and buys with the pass; the report shows the room's figures.
    #[arg(long, conflicts_with = "direct")]
    waiting_room: bool,
    /// Buyers the waiting room admits a second (with --waiting-room). The seed's cluster-wide
    /// limit of the buy path is 1,000 a second.
    #[arg(long, default_value_t = 1000, requires = "waiting_room")]
    admission_rate: u32,
}

impl Options {
    /// The run's settings, for the report.
    fn settings(&self) -> Vec<(String, String)> {
        vec![
            ("items on sale".into(), self.sale.stock.to_string()),
            (
                "create-order requests".into(),
                self.sale.requests.to_string(),
            ),
            (
                "requests in flight".into(),
                self.sale.concurrency.to_string(),
            ),
            (
                "repeat buyers".into(),
                format!("1 request in {}", self.sale.repeat_every),
            ),
            (
                "buyers' way in".into(),
                match (self.direct, self.waiting_room) {
                    (true, _) => "order-service (--direct)".to_owned(),
                    (false, Some(rate)) => {
                        format!("the gateway's waiting room, {rate} admitted a second")
                    }
                    (false, None) => "the gateway".to_owned(),
                },
            ),
            (
                "a refused buyer retries for".into(),
                format!("{} s", self.sale.retry_ms / 1000),
            ),
            ("seconds to pay".into(), self.pay_timeout_secs.to_string()),
            ("price".into(), format!("{PRICE_CENTS} cents")),
        ]
    }
}

impl Args {
    fn options(&self) -> Options {
        Options {
            sale: SaleConfig {
                activity: 1,
                stock: self.stock,
                requests: self.requests,
                concurrency: self.concurrency,
                repeat_every: 3,
                first_user: 1,
                retry_ms: if self.direct { 0 } else { BUYER_PATIENCE_MS },
            },
            hey: self.hey,
            compare_wrk: self.compare_wrk,
            pay_timeout_secs: self.pay_timeout_secs,
            direct: self.direct,
            redis_cluster: self.redis_cluster,
            waiting_room: self.waiting_room.then_some(self.admission_rate),
        }
    }
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let options = args.options();
    crate::setup::run()?;
    services::build()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(sale(options))
}

async fn sale(o: Options) -> anyhow::Result<()> {
    let root = services::workspace_root().join("target/flash-sale");
    println!(
        "starting a private Redis, MariaDB and nisshi broker under {}",
        root.display()
    );
    let stack = Stack::start_with(StackOptions {
        storage: BrokerStorage::Sqlite,
        root: Some(root.clone()),
        detached: false,
        redis_cluster: o.redis_cluster,
        mysql_for_load: true,
    })
    .await?;
    let info = stack.info().clone();
    let mut children = Vec::new();
    let mut started = Vec::new();
    for name in services::SERVICES {
        let (child, svc) = services::start(name, &info, false)?;
        println!(
            "  {:<18} {}  (metrics {}/metrics)",
            svc.name,
            svc.url(),
            svc.management_url()
        );
        children.push(child);
        started.push(svc);
    }
    let inventory_url = started[1].url();
    // The buyers' way in: the gateway (flow control, the sold-out short circuit) unless --direct.
    let order_url = if o.direct {
        started[0].url()
    } else {
        let mut launch = services::gateway_launch(&started[0], &started[1])?;
        if let Some(rate) = o.waiting_room {
            // The deployed rules, with a room in front of the sale's activity.
            let rules = root.join("gateway-rules.toml");
            let example = std::fs::read_to_string(
                services::workspace_root().join("services/gateway/rules.example.toml"),
            )?;
            std::fs::write(
                &rules,
                format!(
                    "{example}\n[[waiting_room]]\nactivity = {}\nrate = {rate}\nburst = 0\n",
                    o.sale.activity
                ),
            )?;
            launch.env.push((
                "FLASH_SALE_RULES__FILE".to_owned(),
                rules.display().to_string(),
            ));
        }
        let (child, gateway) = launch.start(&info, false)?;
        println!(
            "  {:<18} {}  (metrics {}/metrics): the buyers' way in",
            gateway.name,
            gateway.url(),
            gateway.management_url()
        );
        children.insert(0, child);
        gateway.url()
    };

    let mut written = None;
    let result = async {
        let http = http_client();
        let admin = Admin::new(http.clone(), &inventory_url, LOCAL_ADMIN_TOKEN);
        admin
            .create_activity_with(
                o.sale.activity,
                o.sale.stock,
                serde_json::json!({"priceCents": PRICE_CENTS, "payTimeoutSecs": o.pay_timeout_secs}),
            )
            .await?;
        println!(
            "\n1. the sale: activity {} on sale with {} items at {PRICE_CENTS} cents, {} s to pay; {} buyers send {} requests ({} at a time; 1 request in {} repeats a user who already tried)\n",
            o.sale.activity,
            o.sale.stock,
            o.pay_timeout_secs,
            o.sale.requests - o.sale.requests / o.sale.repeat_every.max(1),
            o.sale.requests,
            o.sale.concurrency,
            o.sale.repeat_every
        );
        let stores = Stores::connect(&info.database_url(), &info.redis_url()).await?;
        let origin = Instant::now();
        let sampler = Arc::new(Sampler::start(stores.clone(), o.sale.activity, origin));
        let mut timeline = Timeline::new(origin);

        let buyers = buyer_clients(BUYER_ADDRESSES)?;
        let mut room_notes = Vec::new();
        let load = live_load("sale", &buyers, &order_url, &o.sale, &sampler, o.waiting_room, &mut room_notes).await;
        timeline.mark("sale");
        println!("{load}");
        let drained = stores
            .wait_for_drain(o.sale.activity, Duration::from_secs(300))
            .await?;
        timeline.mark("drain");
        println!("queue drained {:.2} s after the load ended\n", drained.as_secs_f64());

        println!("2. after the sale: of every ten buyers, seven pay, one cancels, two let the order expire");
        let simulator = PaymentSimulator::new(http.clone(), &order_url, LOCAL_PAYMENT_SECRET);
        let after =
            after_the_sale(&http, &order_url, &simulator, PRICE_CENTS, &load.accepted).await?;
        timeline.mark("pay / cancel");
        println!("{after}");
        let expiry = Duration::from_secs(o.pay_timeout_secs as u64 + 120);
        let waited = stores.wait_for_expiry(o.sale.activity, expiry).await?;
        timeline.mark("expiry");
        let back = stores.redis_stock(o.sale.activity).await?;
        println!(
            "  unpaid orders expired and every return reached Redis {:.1} s later: {back} items back on sale\n",
            waited.as_secs_f64()
        );

        let second = SaleConfig {
            stock: back,
            requests: (back as usize * 3).max(100),
            concurrency: o.sale.concurrency.min(200),
            repeat_every: 0,
            first_user: o.sale.first_user + o.sale.requests as i64 + 1_000_000,
            ..o.sale.clone()
        };
        println!(
            "3. the second wave: {} new buyers send {} requests for the {back} items given back\n",
            second.requests, second.requests
        );
        let wave = live_load("second wave", &buyers, &order_url, &second, &sampler, o.waiting_room, &mut room_notes).await;
        timeline.mark("second wave");
        println!("{wave}");
        stores
            .wait_for_drain(o.sale.activity, Duration::from_secs(300))
            .await?;
        timeline.mark("drain");
        // One more sample after the drain, so the charts end on the settled state.
        tokio::time::sleep(Sampler::EVERY + Duration::from_millis(100)).await;
        let (samples, failed_samples) = Arc::into_inner(sampler)
            .expect("the live views are done with the sampler")
            .stop()
            .await;

        let tail = if o.compare_wrk {
            crate::tail::compare(&order_url, o.sale.activity).await?
        } else {
            Vec::new()
        };

        let accepted: Vec<(String, i64)> =
            load.accepted.iter().chain(&wave.accepted).cloned().collect();
        let report = stores
            .check_invariants(o.sale.activity, o.sale.stock, &accepted)
            .await?;
        println!("invariants (docs/design.md), over both waves\n{report}");
        let report_path = root.join("report.json");
        std::fs::write(
            &report_path,
            serde_json::to_string_pretty(&serde_json::json!({
                "load": load,
                "afterSale": after,
                "secondWave": wave,
                "invariants": report,
            }))?,
        )?;
        let page = RunReport {
            title: format!(
                "flash-sale: {} items, {} requests through {}",
                o.sale.stock,
                o.sale.requests,
                if o.direct { "order-service" } else { "the gateway" }
            ),
            settings: o.settings(),
            phases: timeline.phases,
            loads: vec![
                ("The sale".to_owned(), &load),
                ("The second wave".to_owned(), &wave),
            ],
            samples,
            failed_samples,
            invariants: &report,
            origin,
            notes: vec![
                ("paid".into(), after.paid.to_string()),
                ("payments refused".into(), after.payments_refused.to_string()),
                ("cancelled".into(), after.cancelled.to_string()),
                ("cancels refused".into(), after.cancels_refused.to_string()),
                ("left to expire".into(), after.left_to_expire.to_string()),
                ("items back on sale".into(), back.to_string()),
            ]
            .into_iter()
            .chain(room_notes)
            .chain(tail)
            .collect(),
        };
        let html_path = root.join("report.html");
        std::fs::write(&html_path, page.html())?;
        written = Some((html_path.clone(), report_path.clone()));
        check_in_browser(&html_path)?;
        if o.hey {
            run_hey(&order_url)?;
        }
        report.ensure()?;
        if wave.accepted.len() as i64 != back {
            bail!(
                "the second wave bought {} of the {back} items given back",
                wave.accepted.len()
            );
        }
        let errors = load.count_5xx() + wave.count_5xx();
        if errors > 0 {
            bail!("{errors} requests answered 5xx");
        }
        anyhow::Ok(())
    }
    .await;

    println!("\nstopping the services (graceful drain) and the stack");
    for child in &mut children {
        services::stop(child);
    }
    drop(stack);
    if let Some((html, json)) = written {
        println!(
            "\nthe report: {}\n  (its data as JSON: {})",
            html.display(),
            json.display()
        );
    }
    result
}

/// Opens the report in headless Chromium, as the browser test does: the page's own check must
/// find every chart drawn; a screenshot lands beside it (`report.png`).
fn check_in_browser(page: &std::path::Path) -> anyhow::Result<()> {
    let url = format!("file://{}", page.canonicalize()?.display());
    let dom = browser::dump_dom(&url)?;
    let verdict = dom
        .split("id=\"render-check\"")
        .nth(1)
        .and_then(|t| t.split_once('>'))
        .and_then(|(_, t)| t.split_once('<'))
        .map_or("no render check in the page", |(t, _)| t);
    if !verdict.starts_with("render check: all") {
        bail!("the report did not render in Chromium: {verdict}");
    }
    let shot = page.with_extension("png");
    browser::screenshot(&url, &shot, (1100, 3200))?;
    println!(
        "Chromium rendered the report ({verdict}); screenshot {}",
        shot.display()
    );
    Ok(())
}

/// The phases of the run, each ending when [`Timeline::mark`] names it.
struct Timeline {
    origin: Instant,
    phases: Vec<Phase>,
}

impl Timeline {
    fn new(origin: Instant) -> Self {
        Self {
            origin,
            phases: Vec::new(),
        }
    }

    fn mark(&mut self, name: &str) {
        let start = self.phases.last().map_or(Duration::ZERO, |p| p.end);
        self.phases.push(Phase {
            name: name.to_owned(),
            start,
            end: self.origin.elapsed(),
        });
    }
}

/// One load with the live view over it: plain buyers, or with a waiting room (its admission
/// rate) buyers who queue, whose figures are printed and added to `notes`.
async fn live_load(
    label: &str,
    buyers: &[reqwest::Client],
    url: &str,
    config: &SaleConfig,
    sampler: &Arc<Sampler>,
    waiting_room: Option<u32>,
    notes: &mut Vec<(String, String)>,
) -> LoadReport {
    let progress = Arc::new(LoadProgress::default());
    let live = Live::start(label, config.requests, progress.clone(), sampler.clone());
    let load = match waiting_room {
        None => drive_sale_with(buyers, url, config, &progress).await,
        Some(rate) => {
            let (load, room) = drive_room_sale(buyers, url, config, rate, &progress).await;
            live.finish().await;
            println!("the waiting room ({label})\n{room}");
            notes.extend(
                room.rows()
                    .into_iter()
                    .map(|(name, value)| (format!("{label}: {name}"), value)),
            );
            return load;
        }
    };
    live.finish().await;
    load
}

/// The seed's hey command, against activity 2 (10000 items, warmed up the seed's way).
fn run_hey(order_url: &str) -> anyhow::Result<()> {
    println!("\nthe seed's load test: hey -n 100000 -c 1000 (userId \"{{random}}\")");
    let out = Command::new("hey")
        .args(["-n", "100000", "-c", "1000", "-m", "POST"])
        .args(["-H", "Content-Type: application/json"])
        .args([
            "-d",
            r#"{"userId":"{random}","activityId":"1","quantity":1}"#,
        ])
        .arg(format!("{order_url}{}", api::order::CREATE))
        .output()
        .context("running hey")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: String = text
        .lines()
        .filter(|l| {
            l.contains("Requests/sec") || l.contains("[") || l.contains("99%") || l.contains("50%")
        })
        .map(|l| format!("  {}\n", l.trim()))
        .collect();
    println!("{summary}");
    if text.lines().any(|l| l.trim_start().starts_with("[5")) {
        bail!("hey saw 5xx answers:\n{text}");
    }
    Ok(())
}
