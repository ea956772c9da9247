//! The payment simulator: a stand-in for the external payment provider, which confirms a buyer's
//! payment by calling order-service's signed callback (`flash_sale_common::payment`). It plays
//! the provider only; nothing of ours is simulated. Used by the tests, by `cargo xtask sale` (the
//! buyers who pay) and by `cargo xtask pay` (paying by hand against `cargo xtask up`).

use flash_sale_common::api::order::PaymentCallback;
use flash_sale_common::error::{ErrorBody, ErrorCode};
use flash_sale_common::payment;
use serde_json::Value;

/// What the provider does with the answer, by the merchant's code.
#[derive(Debug, Clone, PartialEq)]
pub enum Confirmation {
    /// 200: the order is paid (also for a repeated callback).
    Paid(Value),
    /// The merchant refused the payment: the provider refunds it (`ORDER_EXPIRED`,
    /// `ORDER_ALREADY_PAID`).
    Refund(ErrorCode),
    /// Any other answer: a provider retries later; the simulator reports it.
    Refused(u16, Option<ErrorCode>),
}

#[derive(Clone)]
pub struct PaymentSimulator {
    http: reqwest::Client,
    url: String,
    secret: String,
}

impl PaymentSimulator {
    /// A provider calling `base_url` (order-service's, or the gateway's) with `secret`.
    pub fn new(http: reqwest::Client, base_url: &str, secret: &str) -> Self {
        Self {
            http,
            url: format!(
                "{}{}",
                base_url.trim_end_matches('/'),
                flash_sale_common::api::order::PAYMENT_CALLBACK
            ),
            secret: secret.to_owned(),
        }
    }

    /// Pays `amount_cents` for `quantity` items of `order_no`, as payment `payment_id`.
    pub async fn pay(
        &self,
        order_no: &str,
        amount_cents: i64,
        quantity: u32,
        payment_id: &str,
    ) -> anyhow::Result<Confirmation> {
        let body = serde_json::to_vec(&PaymentCallback {
            payment_id: payment_id.to_owned(),
            order_no: order_no.to_owned(),
            amount_cents,
            quantity,
        })?;
        let now = chrono::Utc::now().timestamp();
        self.send(
            &body,
            now,
            &payment::sign(self.secret.as_bytes(), now, &body),
        )
        .await
    }

    /// Sends `body` with these timestamp and signature headers, as they are: for the tests of
    /// forged, stale and malformed callbacks.
    pub async fn send(
        &self,
        body: &[u8],
        timestamp: i64,
        signature: &str,
    ) -> anyhow::Result<Confirmation> {
        let res = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header(payment::TIMESTAMP_HEADER, timestamp.to_string())
            .header(payment::SIGNATURE_HEADER, signature)
            .body(body.to_vec())
            .send()
            .await?;
        let status = res.status().as_u16();
        let bytes = res.bytes().await?;
        if status == 200 {
            return Ok(Confirmation::Paid(serde_json::from_slice(&bytes)?));
        }
        let code = ErrorBody::code_of(&bytes);
        Ok(match code {
            Some(code @ (ErrorCode::OrderExpired | ErrorCode::OrderPaid)) => {
                Confirmation::Refund(code)
            }
            code => Confirmation::Refused(status, code),
        })
    }

    /// The signature this provider would put on `body` at `timestamp`.
    pub fn sign(&self, timestamp: i64, body: &[u8]) -> String {
        payment::sign(self.secret.as_bytes(), timestamp, body)
    }
}
