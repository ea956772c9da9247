//! The main job: a local flash sale, end to end, with its report.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use flash_sale_common::api;
use flash_sale_tests::apps::http_client;
use flash_sale_tests::scenario::{Admin, SaleConfig, Stores, drive_sale};
use flash_sale_tests::stack::{BrokerStorage, Stack};

use crate::services::{self, LOCAL_ADMIN_TOKEN};

struct Options {
    sale: SaleConfig,
    hey: bool,
}

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
                retry_ms: 0,
            },
            hey: self.hey,
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
    let stack = Stack::start_in(BrokerStorage::Sqlite, Some(&root), false).await?;
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
    let order_url = started[0].url();
    let inventory_url = started[1].url();

    let result = async {
        let http = http_client();
        let admin = Admin::new(http.clone(), &inventory_url, LOCAL_ADMIN_TOKEN);
        admin.create_activity(o.sale.activity, o.sale.stock).await?;
        println!(
            "\nactivity {} on sale with {} items; {} buyers send {} requests ({} at a time; 1 request in {} repeats a user who already tried)\n",
            o.sale.activity,
            o.sale.stock,
            o.sale.requests - o.sale.requests / o.sale.repeat_every.max(1),
            o.sale.requests,
            o.sale.concurrency,
            o.sale.repeat_every
        );
        let load = drive_sale(&http, &order_url, &o.sale).await;
        println!("{load}");
        let stores = Stores::connect(&info.database_url(), &info.redis_url()).await?;
        let drained = stores
            .wait_for_drain(o.sale.activity, Duration::from_secs(300))
            .await?;
        println!("queue drained {:.2} s after the load ended\n", drained.as_secs_f64());
        let report = stores
            .check_invariants(o.sale.activity, o.sale.stock, &load.accepted)
            .await?;
        println!("invariants (docs/design.md)\n{report}");
        let report_path = root.join("report.json");
        std::fs::write(
            &report_path,
            serde_json::to_string_pretty(&serde_json::json!({"load": load, "invariants": report}))?,
        )?;
        println!("full report: {}", report_path.display());
        if o.hey {
            run_hey(&order_url)?;
        }
        report.ensure()?;
        if load.count_5xx() > 0 {
            bail!("{} requests answered 5xx", load.count_5xx());
        }
        anyhow::Ok(())
    }
    .await;

    println!("\nstopping the services (graceful drain) and the stack");
    for child in &mut children {
        services::stop(child);
    }
    drop(stack);
    result
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
