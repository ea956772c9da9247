//! `cargo xtask pay <orderNo>`: pay for an order of the stack `cargo xtask up` started, the way
//! a payment provider confirms a payment: the payment simulator signs the callback with the
//! local secret and sends it to order-service.

use anyhow::{Context, bail};
use flash_sale_common::api;
use flash_sale_tests::apps::http_client;
use flash_sale_tests::payments::{Confirmation, PaymentSimulator};
use serde_json::Value;

use crate::services::LOCAL_PAYMENT_SECRET;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The order to pay (its `orderNo`).
    order_no: String,
    /// The provider's payment id (the callback's idempotency key); a new one by default.
    #[arg(long)]
    payment_id: Option<String>,
    /// Pay this amount instead of the order's (to see a mismatch refused).
    #[arg(long)]
    amount_cents: Option<i64>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let running = crate::up::running()?;
    let order_url = running
        .url_of("order-service")
        .context("order-service is not among what `cargo xtask up` started")?;
    tokio::runtime::Runtime::new()?.block_on(pay(&order_url, args))
}

async fn pay(order_url: &str, args: Args) -> anyhow::Result<()> {
    let http = http_client();
    let res = http
        .get(format!("{order_url}{}", api::order::one(&args.order_no)))
        .send()
        .await?;
    let status = res.status();
    let order: Value = res.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("order {} answered {status}: {order}", args.order_no);
    }
    let quantity = order["quantity"].as_u64().unwrap_or(1) as u32;
    let Some(amount) = args.amount_cents.or(order["amountCents"].as_i64()) else {
        bail!(
            "order {} is {}: nothing to pay yet, retry in a moment",
            args.order_no,
            order["status"]
        );
    };
    let payment_id = args.payment_id.unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        format!("sim-{}", now.unwrap_or_default().as_nanos())
    });
    println!(
        "paying {} cents for {quantity} item(s) of {} as payment {payment_id}",
        amount, args.order_no
    );
    let simulator = PaymentSimulator::new(http, order_url, LOCAL_PAYMENT_SECRET);
    match simulator
        .pay(&args.order_no, amount, quantity, &payment_id)
        .await?
    {
        Confirmation::Paid(order) => println!("paid: {order}"),
        Confirmation::Refund(code) => {
            println!("refused with {code}: the provider refunds the payment")
        }
        Confirmation::Refused(status, code) => {
            bail!(
                "refused: {status} {}",
                code.map_or("(no code)".into(), |c| c.to_string())
            )
        }
    }
    Ok(())
}
