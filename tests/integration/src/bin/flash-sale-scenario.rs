//! Drives one sale against running services and checks the invariants of docs/design.md;
//! exits non-zero when one is broken. The NixOS VM test and `cargo xtask sale` run this same code.
//!
//! ```text
//! flash-sale-scenario --gateway URL --inventory URL --admin-token T \
//!     --database-url mysql://... --redis-url redis://... \
//!     [--activity 1] [--stock 2000] [--requests 20000] [--concurrency 200] [--repeat-every 3]
//! ```

use std::time::Duration;

use anyhow::{Context, bail};
use flash_sale_tests::apps::http_client;
use flash_sale_tests::scenario::{Admin, SaleConfig, Stores, drive_sale};

struct Args {
    gateway: String,
    inventory: String,
    admin_token: String,
    database_url: String,
    redis_url: String,
    sale: SaleConfig,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut out = Args {
        gateway: String::new(),
        inventory: String::new(),
        admin_token: String::new(),
        database_url: String::new(),
        redis_url: String::new(),
        sale: SaleConfig::default(),
    };
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--gateway" => out.gateway = value()?,
            "--inventory" => out.inventory = value()?,
            "--admin-token" => out.admin_token = value()?,
            "--database-url" => out.database_url = value()?,
            "--redis-url" => out.redis_url = value()?,
            "--activity" => out.sale.activity = value()?.parse()?,
            "--stock" => out.sale.stock = value()?.parse()?,
            "--requests" => out.sale.requests = value()?.parse()?,
            "--concurrency" => out.sale.concurrency = value()?.parse()?,
            "--repeat-every" => out.sale.repeat_every = value()?.parse()?,
            other => bail!("unknown argument {other}; see the doc comment of this binary"),
        }
    }
    for (name, v) in [
        ("--gateway", &out.gateway),
        ("--inventory", &out.inventory),
        ("--admin-token", &out.admin_token),
        ("--database-url", &out.database_url),
        ("--redis-url", &out.redis_url),
    ] {
        if v.is_empty() {
            bail!("{name} is required");
        }
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let http = http_client();
    let admin = Admin::new(http.clone(), &args.inventory, &args.admin_token);
    admin
        .create_activity(args.sale.activity, args.sale.stock)
        .await?;
    let load = drive_sale(&http, &args.gateway, &args.sale).await;
    println!("{load}");
    let stores = Stores::connect(&args.database_url, &args.redis_url).await?;
    let drained = stores
        .wait_for_drain(args.sale.activity, Duration::from_secs(120))
        .await?;
    println!(
        "queue drained {:.2} s after the load ended",
        drained.as_secs_f64()
    );
    let report = stores
        .check_invariants(args.sale.activity, args.sale.stock, &load.accepted)
        .await?;
    println!("{report}");
    report.ensure()?;
    if load.count_5xx() > 0 {
        bail!("{} requests answered 5xx", load.count_5xx());
    }
    Ok(())
}
