//! The contract between the services on the wire, in one place: the route paths each service
//! serves, the headers one sets for another, and the error codes read back from a body
//! ([`crate::error::ErrorCode::parse`], by the same table that writes them).
//!
//! A service names its own routes from here, and so does every caller (the gateway, the tests,
//! the load tools): a route renamed here is renamed for all of them, and nothing matches a path
//! it spelled out by hand.

use axum::http::HeaderName;

use crate::domain::ActivityId;

/// The authenticated buyer, set by the gateway (its client's copy is dropped first); it wins
/// over the body's `userId` at order-service.
pub const USER_HEADER: HeaderName = HeaderName::from_static("x-user-id");

/// The request's id: generated at the first service that sees the request, passed on by every
/// hop and returned to the client.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// order-service's public routes.
pub mod order {
    use serde::{Deserialize, Serialize};
    use serde_json::Value;

    /// Everything order-service serves sits under this prefix (the gateway routes on it).
    pub const PREFIX: &str = "/api/flash-sale/";
    /// The buy path: `POST`, the seed's body.
    pub const CREATE: &str = "/api/flash-sale/order/create";
    /// One order, as an axum route (`GET`).
    pub const ONE: &str = "/api/flash-sale/order/{order_no}";

    /// The buyer cancels one of their orders (`POST`); its stock goes back on sale.
    pub const CANCEL: &str = "/api/flash-sale/order/{order_no}/cancel";
    /// The buyer's own orders (`GET`), newest first.
    pub const MINE: &str = "/api/flash-sale/orders";
    /// The payment provider confirms a payment (`POST`, signed: [`crate::payment`]). The
    /// gateway asks no buyer's token for it: the signature is its authentication.
    pub const PAYMENT_CALLBACK: &str = "/api/flash-sale/payment/callback";

    /// The path of one order, as a `Location` and for clients.
    pub fn one(order_no: impl std::fmt::Display) -> String {
        format!("/api/flash-sale/order/{order_no}")
    }

    /// The path that cancels one order.
    pub fn cancel(order_no: impl std::fmt::Display) -> String {
        format!("/api/flash-sale/order/{order_no}/cancel")
    }

    /// The buy path's body, the seed's: `{"userId":"42","activityId":"1","quantity":1}`, ids as
    /// strings or numbers. Read by the gateway and by order-service through the same parser
    /// ([`crate::json::parse_object`]); fields stay raw JSON and are checked by the domain
    /// parsers, for precise errors.
    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct CreateOrderRequest {
        pub user_id: Option<Value>,
        pub activity_id: Option<Value>,
        pub quantity: Option<Value>,
    }

    /// The body of a payment confirmation, as the provider sends it. Every field is required;
    /// the amount is in the currency's smallest unit.
    #[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct PaymentCallback {
        /// The provider's id of the payment: the idempotency key of the callback.
        pub payment_id: String,
        pub order_no: String,
        pub amount_cents: i64,
        pub quantity: u32,
    }
}

/// inventory-service's admin routes.
pub mod inventory {
    use super::ActivityId;

    /// Everything inventory-service serves sits under this prefix (the gateway routes on it).
    pub const PREFIX: &str = "/api/inventory/";
    /// `POST` creates an activity, `GET` lists them.
    pub const ACTIVITIES: &str = "/api/inventory/activities";
    /// One activity (`GET`).
    pub const ACTIVITY: &str = "/api/inventory/activities/{id}";
    /// Loads one activity's stock into Redis (`POST`).
    pub const WARMUP_ONE: &str = "/api/inventory/activities/{id}/warmup";
    /// Adds stock to one activity (`POST`).
    pub const RESTOCK: &str = "/api/inventory/activities/{id}/restock";
    /// Warms up every current activity (`POST`).
    pub const WARMUP_ALL: &str = "/api/inventory/warmup";
    /// Runs the reconciler now (`POST`).
    pub const RECONCILE: &str = "/api/inventory/reconcile";

    /// The path of one activity, with `action` (`""`, `"warmup"`, `"restock"`) after it.
    pub fn activity(id: impl std::fmt::Display, action: &str) -> String {
        match action {
            "" => format!("{ACTIVITIES}/{id}"),
            action => format!("{ACTIVITIES}/{id}/{action}"),
        }
    }

    /// What a successful `POST` to `path` may have done to the stock on sale: the routes that
    /// put stock back on sale, for callers that remember a sold-out activity (the gateway's
    /// short circuit).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum StockChange {
        /// One activity was warmed up or restocked.
        Activity(ActivityId),
        /// Every current activity was warmed up.
        All,
    }

    impl StockChange {
        pub fn of_post(path: &str) -> Option<Self> {
            if path == WARMUP_ALL {
                return Some(Self::All);
            }
            let rest = path.strip_prefix(ACTIVITIES)?.strip_prefix('/')?;
            let (id, action) = rest.split_once('/')?;
            let changes_stock = [WARMUP_ONE, RESTOCK]
                .iter()
                .any(|route| route.rsplit_once('/').is_some_and(|(_, a)| a == action));
            changes_stock
                .then(|| id.parse().ok().map(Self::Activity))
                .flatten()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::inventory::{self, StockChange};
    use super::*;

    #[test]
    fn the_routes_that_put_stock_back_on_sale_are_recognised() {
        let nine = ActivityId::new(9).unwrap();
        assert_eq!(
            StockChange::of_post(&inventory::activity(9, "restock")),
            Some(StockChange::Activity(nine))
        );
        assert_eq!(
            StockChange::of_post(&inventory::activity(9, "warmup")),
            Some(StockChange::Activity(nine))
        );
        assert_eq!(
            StockChange::of_post(inventory::WARMUP_ALL),
            Some(StockChange::All)
        );
        for other in [
            inventory::activity(9, ""),
            inventory::activity("x", "restock"),
            inventory::activity(9, "delete"),
            inventory::RECONCILE.to_owned(),
            order::CREATE.to_owned(),
        ] {
            assert_eq!(StockChange::of_post(&other), None, "{other}");
        }
    }

    /// The wire as clients know it (the seed's paths): changing one is a breaking change of the
    /// public API, made here on purpose or not at all.
    #[test]
    fn the_public_contract_is_what_clients_were_told() {
        assert_eq!(order::CREATE, "/api/flash-sale/order/create");
        assert_eq!(order::one("1-ab"), "/api/flash-sale/order/1-ab");
        assert_eq!(order::cancel("1-ab"), "/api/flash-sale/order/1-ab/cancel");
        assert_eq!(order::MINE, "/api/flash-sale/orders");
        assert_eq!(order::PAYMENT_CALLBACK, "/api/flash-sale/payment/callback");
        assert_eq!(inventory::ACTIVITIES, "/api/inventory/activities");
        assert_eq!(inventory::WARMUP_ALL, "/api/inventory/warmup");
        assert_eq!(inventory::RECONCILE, "/api/inventory/reconcile");
        assert_eq!(USER_HEADER, "x-user-id");
        assert_eq!(REQUEST_ID_HEADER, "x-request-id");
    }

    #[test]
    fn the_path_builders_match_their_routes() {
        assert_eq!(order::one("{order_no}"), order::ONE);
        assert_eq!(order::cancel("{order_no}"), order::CANCEL);
        assert_eq!(inventory::activity("{id}", ""), inventory::ACTIVITY);
        assert_eq!(inventory::activity("{id}", "warmup"), inventory::WARMUP_ONE);
        assert_eq!(inventory::activity("{id}", "restock"), inventory::RESTOCK);
        for route in [
            order::CREATE,
            order::ONE,
            order::CANCEL,
            order::MINE,
            order::PAYMENT_CALLBACK,
        ] {
            assert!(route.starts_with(order::PREFIX), "{route}");
        }
        for route in [
            inventory::ACTIVITIES,
            inventory::WARMUP_ALL,
            inventory::RECONCILE,
        ] {
            assert!(route.starts_with(inventory::PREFIX), "{route}");
        }
    }
}
