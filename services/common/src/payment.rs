//! How a payment provider signs the callback that confirms a payment, and how it is checked.
//!
//! The provider sends two headers with the JSON body:
//! - `x-payment-timestamp`: when it signed, in seconds since the epoch;
//! - `x-payment-signature`: `v1=` and the hex HMAC-SHA256, under the shared secret, of
//!   `<timestamp>.<body>`.
//!
//! The timestamp is inside the signed text, so an old callback cannot be replayed under a new
//! time, and a callback older (or newer) than the replay window is refused. The scheme is the
//! one providers commonly use for webhooks (Stripe's `t=...,v1=...` is the best known); the
//! comparison is constant-time (`Mac::verify_slice`).

use axum::http::HeaderName;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const TIMESTAMP_HEADER: HeaderName = HeaderName::from_static("x-payment-timestamp");
pub const SIGNATURE_HEADER: HeaderName = HeaderName::from_static("x-payment-signature");

const VERSION: &str = "v1=";

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `x-payment-signature` value for a body signed at `timestamp`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let tag = mac(secret, timestamp, body).finalize().into_bytes();
    format!("{VERSION}{}", hex::encode(tag))
}

/// Why a callback's signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no payment callback secret is configured: every callback is refused")]
    NoSecret,
    #[error("the x-payment-timestamp or x-payment-signature header is missing or malformed")]
    Malformed,
    #[error("the signature does not match the timestamp and body")]
    Mismatch,
    #[error("the timestamp is {age_secs} s from now, outside the replay window")]
    Stale { age_secs: i64 },
}

/// Checks a callback: the signature first (so an attacker learns nothing from the clock check),
/// then that `timestamp` is within `window_secs` of `now_secs`.
pub fn verify(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_secs: i64,
    window_secs: i64,
) -> Result<(), SignatureError> {
    if secret.is_empty() {
        return Err(SignatureError::NoSecret);
    }
    let timestamp: i64 = timestamp
        .and_then(|t| t.trim().parse().ok())
        .ok_or(SignatureError::Malformed)?;
    let tag = signature
        .and_then(|s| s.trim().strip_prefix(VERSION))
        .and_then(|h| hex::decode(h).ok())
        .ok_or(SignatureError::Malformed)?;
    mac(secret, timestamp, body)
        .verify_slice(&tag)
        .map_err(|_| SignatureError::Mismatch)?;
    let age_secs = now_secs - timestamp;
    if age_secs.abs() > window_secs {
        return Err(SignatureError::Stale { age_secs });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec-test-0123456789";
    const BODY: &[u8] = br#"{"paymentId":"pay_1","orderNo":"1-0","amountCents":100,"quantity":1}"#;

    /// Computed independently of this code, with Python's hmac module:
    /// `hmac.new(SECRET, b"1700000000." + BODY, hashlib.sha256).hexdigest()`.
    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
        assert_eq!(
            sign(SECRET, 1_700_000_000, BODY),
            "v1=2194acc3432b07c2a5aa07f473b81f788354f07b38654ef876ee89fdf70c1a26"
        );
    }

    #[test]
    fn a_good_callback_within_the_window_passes() {
        let sig = sign(SECRET, 1_000, BODY);
        assert_eq!(
            verify(SECRET, Some("1000"), Some(&sig), BODY, 1_200, 300),
            Ok(())
        );
        assert_eq!(
            verify(SECRET, Some("1000"), Some(&sig), BODY, 800, 300),
            Ok(())
        );
    }

    #[test]
    fn anything_else_is_refused_for_its_reason() {
        let sig = sign(SECRET, 1_000, BODY);
        let check = |secret: &[u8], ts: Option<&str>, sig: Option<&str>, body: &[u8], now| {
            verify(secret, ts, sig, body, now, 300)
        };
        assert_eq!(
            check(b"", Some("1000"), Some(&sig), BODY, 1_000),
            Err(SignatureError::NoSecret)
        );
        assert_eq!(
            check(SECRET, None, Some(&sig), BODY, 1_000),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            check(SECRET, Some("x"), Some(&sig), BODY, 1_000),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            check(SECRET, Some("1000"), None, BODY, 1_000),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            check(
                SECRET,
                Some("1000"),
                Some(sig.trim_start_matches("v1=")),
                BODY,
                1_000
            ),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            check(SECRET, Some("1000"), Some("v1=zz"), BODY, 1_000),
            Err(SignatureError::Malformed)
        );
        // another body, another time, another secret: the tag no longer matches
        assert_eq!(
            check(SECRET, Some("1000"), Some(&sig), b"{}", 1_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(SECRET, Some("1001"), Some(&sig), BODY, 1_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(b"other", Some("1000"), Some(&sig), BODY, 1_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(SECRET, Some("1000"), Some(&sig), BODY, 1_301),
            Err(SignatureError::Stale { age_secs: 301 })
        );
    }
}
