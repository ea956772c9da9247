//! Runs one service, as the tests configured it, in a process of its own: the `api` tests'
//! `ServiceProcess` starts it when a test needs a service whose `/metrics` holds only its own
//! series (in-process services share one recorder), or one it can kill like a pod.
//!
//! ```text
//! flash-sale-service <order-service|inventory-service|gateway> <settings as JSON>
//! ```
//!
//! Once it listens it prints `flash-sale-service-listening <base url> <management url>`
//! (`apps::SERVICE_READY`) on a line of its own. It runs until its stdin reaches end of file,
//! then drains and stops the service: the parent keeps the other end open, so a test binary that
//! dies without dropping its `ServiceProcess` (which kills the child outright) leaves no service
//! behind. Logs go to stderr at `RUST_LOG` (default `warn`).

use anyhow::{Context, bail};
use flash_sale_tests::apps::{
    SERVICE_READY, spawn_gateway, spawn_inventory_service, spawn_order_service,
};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(service), Some(settings), None) = (args.next(), args.next(), args.next()) else {
        bail!(
            "usage: flash-sale-service <order-service|inventory-service|gateway> <settings JSON>"
        );
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let app = match service.as_str() {
        "order-service" => spawn_order_service(parse(&service, &settings)?).await,
        "inventory-service" => spawn_inventory_service(parse(&service, &settings)?).await,
        "gateway" => spawn_gateway(parse(&service, &settings)?).await,
        other => bail!("unknown service {other}"),
    }
    .with_context(|| format!("starting {service}"))?;
    println!("{SERVICE_READY} {} {}", app.base_url, app.management_url);

    // The parent holds the other end of stdin: end of file means it is gone.
    tokio::task::spawn_blocking(|| {
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())
    })
    .await??;
    app.stop().await
}

fn parse<T: serde::de::DeserializeOwned>(service: &str, settings: &str) -> anyhow::Result<T> {
    serde_json::from_str(settings).with_context(|| format!("reading {service}'s settings"))
}
