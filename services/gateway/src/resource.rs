//! The names rules apply to: routes (Sentinel's route resources), activities, downstreams.

use std::fmt;
use std::str::FromStr;

use flash_sale_common::domain::ActivityId;
use serde::{Deserialize, Serialize};

/// A route of the gateway, named like the seed's Spring Cloud Gateway route ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteId {
    /// `/api/flash-sale/**` -> order-service.
    FlashSale,
    /// `/api/inventory/**` -> inventory-service.
    Inventory,
}

impl RouteId {
    pub const ALL: [RouteId; 2] = [RouteId::FlashSale, RouteId::Inventory];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::FlashSale => "flash-sale-order",
            Self::Inventory => "inventory",
        }
    }

    pub const fn downstream(self) -> Downstream {
        match self {
            Self::FlashSale => Downstream::OrderService,
            Self::Inventory => Downstream::InventoryService,
        }
    }
}

/// A service behind the gateway; each has its own circuit breakers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Downstream {
    OrderService,
    InventoryService,
}

impl Downstream {
    pub const ALL: [Downstream; 2] = [Downstream::OrderService, Downstream::InventoryService];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::OrderService => "order-service",
            Self::InventoryService => "inventory-service",
        }
    }
}

impl fmt::Display for Downstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a rule names in its `resource` field: a route id or `activity:<id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKey {
    Route(RouteId),
    Activity(ActivityId),
}

impl FromStr for ResourceKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(route) = RouteId::ALL.into_iter().find(|r| r.as_str() == s) {
            return Ok(Self::Route(route));
        }
        if let Some(id) = s.strip_prefix("activity:") {
            return id
                .parse::<ActivityId>()
                .map(Self::Activity)
                .map_err(|_| format!("`{s}`: the activity id must be a positive integer"));
        }
        Err(format!(
            "unknown resource `{s}`: expected `flash-sale-order`, `inventory` or `activity:<id>`"
        ))
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Route(r) => f.write_str(r.as_str()),
            Self::Activity(a) => write!(f, "activity:{a}"),
        }
    }
}
