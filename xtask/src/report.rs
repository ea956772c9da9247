//! `cargo xtask report --activity N`: the report of a finished activity, from MySQL and Redis
//! (the seed's 生成活动报告 and 数据一致性校验): what sold, a timeline from the orders'
//! timestamps, the drift between Redis and MySQL (repaired with `--repair`), the invariants
//! that can be checked after the fact. One HTML file, like the main job's report. With
//! `--prometheus-url`, also the sale as the services' metrics saw it (docs/report.md).

use std::path::PathBuf;

use anyhow::Context;
use flash_sale_tests::apps::http_client;
use flash_sale_tests::report::{ActivityReport, PROMETHEUS_NO_DATA};
use flash_sale_tests::scenario::{Admin, Stores};

use crate::services::{self, LOCAL_ADMIN_TOKEN};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The activity to report on.
    #[arg(long)]
    activity: i64,
    /// MySQL to read (default: the stack `cargo xtask up` started).
    #[arg(long, requires = "redis_url")]
    database_url: Option<String>,
    /// Redis to read (default: the stack `cargo xtask up` started).
    #[arg(long, requires = "database_url")]
    redis_url: Option<String>,
    /// Run a reconcile pass through inventory-service's admin API first, so the report shows
    /// what it repaired (default: the inventory-service `cargo xtask up` started, with its
    /// local admin token; elsewhere give --inventory-url and FLASH_SALE_ADMIN_TOKEN).
    #[arg(long)]
    repair: bool,
    #[arg(long, requires = "repair")]
    inventory_url: Option<String>,
    /// A Prometheus that scraped the services (labelled as the monitoring bundle labels them):
    /// adds the section "From Prometheus" over the activity's time range. One that cannot be
    /// reached, or refuses a query, fails the command before any page is written.
    #[arg(long)]
    prometheus_url: Option<String>,
    /// Where to write the page (default: target/flash-sale/activity-N.html).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let running = match (&args.database_url, &args.redis_url) {
        (Some(_), Some(_)) => None,
        _ => Some(crate::up::running()?),
    };
    let (database_url, redis_url) = match (&args.database_url, &args.redis_url, &running) {
        (Some(d), Some(r), _) => (d.clone(), r.clone()),
        (_, _, Some(running)) => (running.stack().database_url(), running.stack().redis_url()),
        _ => unreachable!("either both URLs or what `up` runs"),
    };
    let out = args.out.clone().unwrap_or_else(|| {
        services::workspace_root()
            .join(format!("target/flash-sale/activity-{}.html", args.activity))
    });
    tokio::runtime::Runtime::new()?.block_on(async {
        let stores = Stores::connect(&database_url, &redis_url).await?;
        let repair = if args.repair {
            let (url, token) = match (&args.inventory_url, &running) {
                (Some(url), _) => (
                    url.clone(),
                    std::env::var("FLASH_SALE_ADMIN_TOKEN")
                        .context("--inventory-url needs FLASH_SALE_ADMIN_TOKEN")?,
                ),
                (None, Some(running)) => (
                    running
                        .url_of("inventory-service")
                        .context("inventory-service is not among what `cargo xtask up` started")?,
                    LOCAL_ADMIN_TOKEN.to_owned(),
                ),
                (None, None) => {
                    anyhow::bail!("--repair with explicit stores needs --inventory-url")
                }
            };
            let answer = Admin::new(http_client(), &url, &token).reconcile().await?;
            Some(answer.to_string())
        } else {
            None
        };
        let mut report = ActivityReport::build(&stores, args.activity).await?;
        report.repair = repair;
        if let Some(url) = &args.prometheus_url {
            report.read_prometheus(url).await?;
        }
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&out, report.html())?;
        for (name, ok, detail) in report.rows() {
            let mark = match ok {
                Some(true) => "ok  ",
                Some(false) => "FAIL",
                None => "n/a ",
            };
            println!("[{mark}] {name:<17} {detail}");
        }
        println!(
            "activity {}: {} sold, {} paid, {} cancelled, {} expired, drift {}\nthe report: {}",
            args.activity,
            report.invariants.ordered,
            report.invariants.paid,
            report.invariants.cancelled,
            report.invariants.expired,
            report.drift(),
            out.display()
        );
        let mut prometheus_empty = false;
        if let Some(figures) = &report.prometheus {
            let empty = figures.empty_charts();
            for chart in figures.charts.iter().filter(|c| !c.is_empty()) {
                println!("[ok  ] prometheus        {}", chart.title);
            }
            for title in &empty {
                println!("[n/a ] prometheus        {title}: {PROMETHEUS_NO_DATA}");
            }
            for t in &figures.totals {
                let series = if t.series.is_empty() {
                    "all"
                } else {
                    &t.series
                };
                println!(
                    "       prometheus        {} {series}: {:.0}",
                    t.figure, t.total
                );
            }
            prometheus_empty = empty.len() == figures.charts.len();
        }
        anyhow::ensure!(report.all_hold(), "invariants broken (see above)");
        anyhow::ensure!(
            !prometheus_empty,
            "Prometheus at {} has no data for any chart in this range: is it the one that scraped \
             these services, with their `service` labels? (the page's check fails too)",
            args.prometheus_url.as_deref().unwrap_or_default()
        );
        Ok(())
    })
}
