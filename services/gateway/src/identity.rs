//! Who is buying: the user token (JWT, HS256 or RS256) in `Authorization: Bearer ...`.
//!
//! The token's `sub` claim (a string, RFC 7519, of a positive integer) becomes the
//! `x-user-id` header order-service trusts; any `x-user-id` the client sent is removed first,
//! so a buyer cannot buy as someone else. `exp` is required; `iss` and `aud` are checked when
//! configured. Only the configured algorithm is accepted.

use axum::http::{HeaderMap, header};
use flash_sale_common::domain::UserId;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::configuration::{AuthSettings, JwtAlgorithm};
use crate::error::GatewayError;

/// Shortest HS256 secret accepted (RFC 7518: a key at least as long as the hash output).
const MIN_HS256_SECRET: usize = 32;

#[derive(Debug, Deserialize)]
struct Claims {
    sub: serde_json::Value,
}

/// What the identity check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A verified token for this user.
    User(UserId),
    /// No token, let through by the development mode (`auth.trust_body_user_id`).
    Anonymous,
}

pub struct Identity {
    key: Option<DecodingKey>,
    validation: Validation,
    trust_body_user_id: bool,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("algorithm", &self.validation.algorithms)
            .field("trust_body_user_id", &self.trust_body_user_id)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Checks the key material. Without a key, the gateway starts only in development mode
    /// (then every presented token is refused, and requests without one pass).
    pub fn from_settings(settings: &AuthSettings) -> anyhow::Result<Self> {
        let (algorithm, key) = match settings.algorithm {
            JwtAlgorithm::HS256 => {
                let secret = settings.hs256_secret.expose();
                let key = if secret.is_empty() {
                    None
                } else if secret.len() < MIN_HS256_SECRET {
                    anyhow::bail!("auth.hs256_secret must be at least {MIN_HS256_SECRET} bytes");
                } else {
                    Some(DecodingKey::from_secret(secret.as_bytes()))
                };
                (Algorithm::HS256, key)
            }
            JwtAlgorithm::RS256 => {
                let pem = settings.rs256_public_key.trim();
                let key = if pem.is_empty() {
                    None
                } else {
                    Some(DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| {
                        anyhow::anyhow!(
                            "auth.rs256_public_key is not an RSA public key in PEM: {e}"
                        )
                    })?)
                };
                (Algorithm::RS256, key)
            }
        };
        if key.is_none() && !settings.trust_body_user_id {
            anyhow::bail!(
                "no token key: set auth.hs256_secret (HS256) or auth.rs256_public_key (RS256), \
                 or auth.trust_body_user_id = true for development"
            );
        }
        if settings.trust_body_user_id {
            tracing::warn!(
                "auth.trust_body_user_id is on: requests without a token pass (development mode)"
            );
        }
        let mut validation = Validation::new(algorithm);
        validation.leeway = settings.leeway_secs;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        if let Some(issuer) = &settings.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &settings.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        Ok(Self {
            key,
            validation,
            trust_body_user_id: settings.trust_body_user_id,
        })
    }

    /// Whether requests without a token pass (development mode).
    pub fn trusts_body_user_id(&self) -> bool {
        self.trust_body_user_id
    }

    /// Verifies the request's token.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, GatewayError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return if self.trust_body_user_id {
                Ok(Caller::Anonymous)
            } else {
                Err(GatewayError::MissingToken)
            };
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(GatewayError::InvalidToken(
                "the Authorization header must be `Bearer <token>`",
            ))?;
        let key = self.key.as_ref().ok_or(GatewayError::InvalidToken(
            "this gateway has no key to verify tokens",
        ))?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => GatewayError::ExpiredToken,
                    ErrorKind::ImmatureSignature => {
                        GatewayError::InvalidToken("the token is not valid yet")
                    }
                    ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => {
                        GatewayError::InvalidToken("the token was issued for someone else")
                    }
                    ErrorKind::MissingRequiredClaim(_) => {
                        GatewayError::InvalidToken("the token lacks `sub` or `exp`")
                    }
                    _ => GatewayError::InvalidToken("the token is not valid"),
                }
            })?;
        let user = UserId::parse(Some(&data.claims.sub))
            .map_err(|_| GatewayError::InvalidToken("the token's subject is not a user id"))?;
        Ok(Caller::User(user))
    }
}
