use flash_sale_common::{configuration, shutdown, telemetry};
use gateway::{Application, Settings};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = configuration::load(Settings::default())?;
    telemetry::init_tracing(&settings.telemetry);
    let app = Application::build(settings).await?;
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone());
    app.run_until_stopped(token).await
}
