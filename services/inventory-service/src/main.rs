use flash_sale_common::{configuration, db, shutdown, telemetry};
use inventory_service::{Application, Settings};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's malloc: allocation was a fifth of the gateway's CPU under the
/// bench's load (docs/performance.md); the services share its allocation pattern.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = configuration::load(Settings::default())?;
    telemetry::init_tracing(&settings.telemetry);
    match std::env::args().nth(1).as_deref() {
        // `inventory-service migrate`: apply the schema and exit (the Kubernetes migration Job).
        Some("migrate") => {
            let pool = db::pool(&settings.database)?;
            db::MIGRATOR.run(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        None => {
            let app = Application::build(settings).await?;
            let token = CancellationToken::new();
            shutdown::cancel_on_signal(token.clone());
            app.run_until_stopped(token).await
        }
        Some(other) => anyhow::bail!("unknown command {other:?}; the only command is `migrate`"),
    }
}
