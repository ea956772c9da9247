//! Domain values. Raw input becomes one of these through a `parse` constructor, so handlers and
//! scripts only ever see checked data.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;

/// Parses a positive 64-bit id that arrived as a JSON number or a JSON string of digits.
fn parse_id(field: &'static str, raw: Option<&Value>) -> Result<i64, ApiError> {
    let bad = || {
        ApiError::invalid(format!(
            "{field} must be a positive integer, as a JSON number or a string of digits"
        ))
    };
    let id = match raw {
        None | Some(Value::Null) => return Err(ApiError::invalid(format!("{field} is required"))),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(bad)?,
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<i64>().map_err(|_| bad())?
        }
        Some(_) => return Err(bad()),
    };
    if id > 0 { Ok(id) } else { Err(bad()) }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(i64);

        impl $name {
            /// Parses the id from a JSON value (number or string of digits).
            pub fn parse(raw: Option<&Value>) -> Result<Self, ApiError> {
                parse_id($field, raw).map(Self)
            }

            /// Wraps an id read from a trusted place (the database, a path segment already parsed).
            pub fn new(id: i64) -> Option<Self> {
                (id > 0).then_some(Self(id))
            }

            pub fn get(self) -> i64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = ApiError;
            fn from_str(s: &str) -> Result<Self, ApiError> {
                Self::parse(Some(&Value::String(s.to_owned())))
            }
        }
    };
}

id_type!(
    /// A buyer.
    UserId,
    "userId"
);
id_type!(
    /// A sale (秒杀活动), keyed by `inventory.activity_id`.
    ActivityId,
    "activityId"
);

/// How many items one order buys: 1 to the configured maximum per order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Quantity(u32);

impl Quantity {
    /// Parses a quantity; a missing one means 1.
    pub fn parse(raw: Option<&Value>, max: u32) -> Result<Self, ApiError> {
        let bad = || {
            ApiError::invalid(format!(
                "quantity must be an integer from 1 to {max}, as a JSON number or a string of digits"
            ))
        };
        let n = match raw {
            None | Some(Value::Null) => 1,
            Some(Value::Number(n)) => n.as_u64().ok_or_else(bad)?,
            Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse::<u64>().map_err(|_| bad())?
            }
            Some(_) => return Err(bad()),
        };
        if (1..=u64::from(max)).contains(&n) {
            Ok(Self(n as u32))
        } else {
            Err(bad())
        }
    }

    pub fn new(n: u32) -> Option<Self> {
        (n > 0).then_some(Self(n))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// An order number: `<activity id>-<UUIDv7 as 32 hex digits>`. Unique without coordination
/// between pods, sortable by time, and it names its activity, so a status lookup knows which
/// Redis slot holds the reservation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderNo(String);

impl OrderNo {
    pub fn generate(activity: ActivityId) -> Self {
        Self(format!("{activity}-{}", uuid::Uuid::now_v7().simple()))
    }

    /// Parses an order number from a path or a message.
    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        Self::split(raw)
            .map(|_| Self(raw.to_owned()))
            .ok_or_else(|| ApiError::invalid("orderNo must look like <activityId>-<32 hex digits>"))
    }

    fn split(raw: &str) -> Option<ActivityId> {
        let (activity, id) = raw.split_once('-')?;
        let hex_ok = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
        let activity = activity.parse::<ActivityId>().ok()?;
        hex_ok.then_some(activity)
    }

    /// The activity the order belongs to.
    pub fn activity(&self) -> ActivityId {
        Self::split(&self.0).expect("an OrderNo is only built valid")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrderNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an order stands (docs/orders.md has the state machine). `Pending` orders are in the
/// queue and Redis only; the others are rows of `orders`, by the `status` code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Pending,
    /// In MySQL, awaiting payment until its deadline.
    Created,
    Paid,
    /// Cancelled by the buyer; its stock went back on sale.
    Cancelled,
    /// Not paid by its deadline; its stock went back on sale.
    Expired,
}

impl OrderStatus {
    /// The states stored in MySQL, in code order.
    pub const STORED: [Self; 4] = [Self::Created, Self::Paid, Self::Cancelled, Self::Expired];

    /// The `orders.status` code (`None` for `Pending`, which is not stored).
    pub const fn code(self) -> Option<i8> {
        match self {
            Self::Pending => None,
            Self::Created => Some(0),
            Self::Paid => Some(1),
            Self::Cancelled => Some(2),
            Self::Expired => Some(3),
        }
    }

    pub fn from_code(code: i8) -> Option<Self> {
        Self::STORED.into_iter().find(|s| s.code() == Some(code))
    }

    /// The name in the API and in metric labels' upper-case form.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Created => "CREATED",
            Self::Paid => "PAID",
            Self::Cancelled => "CANCELLED",
            Self::Expired => "EXPIRED",
        }
    }

    /// Whether the order holds stock (no oversell and conservation count these).
    pub const fn is_live(self) -> bool {
        matches!(self, Self::Pending | Self::Created | Self::Paid)
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The event the buy path publishes and the consumer turns into a MySQL order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderEvent {
    pub order_no: OrderNo,
    pub user_id: UserId,
    pub activity_id: ActivityId,
    pub quantity: Quantity,
    /// When the stock was reserved, in ms since the epoch, by the clock of the order-service
    /// pod that reserved it (read when the reserve script answered).
    pub reserved_at_ms: i64,
}

/// The payload of one broker record: the order events published together (a lot).
///
/// A lot of one is the event's own JSON object, the shape every record had before lots, so a
/// consumer of any version reads it; a larger lot is a JSON array of events. Grouping orders
/// into one record is what makes the broker's per-record cost a per-lot cost
/// (docs/performance.md, "Orders in lots"). `events` are events already serialized with
/// `serde_json`.
pub fn encode_lot<'a>(events: impl ExactSizeIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut events = events.peekable();
    let mut payload = Vec::new();
    let single = events.len() == 1;
    if !single {
        payload.push(b'[');
    }
    while let Some(event) = events.next() {
        payload.extend_from_slice(event);
        if events.peek().is_some() {
            payload.push(b',');
        }
    }
    if !single {
        payload.push(b']');
    }
    payload
}

/// The events of one broker record, in either shape [`encode_lot`] writes.
pub fn decode_lot(payload: &[u8]) -> serde_json::Result<Vec<OrderEvent>> {
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(payload),
        _ => serde_json::from_slice(payload).map(|event| vec![event]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(user: i64) -> OrderEvent {
        let activity = ActivityId::new(3).unwrap();
        OrderEvent {
            order_no: OrderNo::generate(activity),
            user_id: UserId::new(user).unwrap(),
            activity_id: activity,
            quantity: Quantity::new(1).unwrap(),
            reserved_at_ms: 1_700_000_000_000 + user,
        }
    }

    #[test]
    fn a_lot_reads_back_as_its_events_and_a_lot_of_one_is_a_bare_event() {
        for n in [1, 2, 5] {
            let events: Vec<OrderEvent> = (1..=n).map(event).collect();
            let serialized: Vec<Vec<u8>> = events
                .iter()
                .map(|e| serde_json::to_vec(e).unwrap())
                .collect();
            let payload = encode_lot(serialized.iter().map(Vec::as_slice));
            assert_eq!(decode_lot(&payload).unwrap(), events, "a lot of {n}");
            if n == 1 {
                // What a consumer from before lots reads.
                let old: OrderEvent = serde_json::from_slice(&payload).unwrap();
                assert_eq!(old, events[0]);
            }
        }
    }

    #[test]
    fn a_record_that_is_not_a_lot_of_events_is_an_error() {
        let good = serde_json::to_string(&event(1)).unwrap();
        for bad in [
            "".to_string(),
            "[".to_string(),
            "{\"orderNo\":1}".to_string(),
            format!("[{good},{{}}]"),
            format!("{good}{good}"),
        ] {
            assert!(decode_lot(bad.as_bytes()).is_err(), "{bad:?} decoded");
        }
    }

    #[test]
    fn ids_accept_numbers_and_digit_strings_only() {
        assert_eq!(UserId::parse(Some(&json!(42))).unwrap().get(), 42);
        assert_eq!(UserId::parse(Some(&json!("42"))).unwrap().get(), 42);
        for bad in [
            json!(0),
            json!(-1),
            json!("-1"),
            json!(1.5),
            json!("4 2"),
            json!(""),
            json!(true),
            json!([1]),
            json!("99999999999999999999"),
            json!(null),
        ] {
            let err = UserId::parse(Some(&bad)).unwrap_err();
            assert!(err.message.contains("userId"), "{bad}: {}", err.message);
        }
        assert!(UserId::parse(None).is_err());
    }

    #[test]
    fn quantity_is_bounded() {
        assert_eq!(Quantity::parse(None, 5).unwrap().get(), 1);
        assert_eq!(Quantity::parse(Some(&json!(5)), 5).unwrap().get(), 5);
        assert_eq!(Quantity::parse(Some(&json!("2")), 5).unwrap().get(), 2);
        for bad in [
            json!(0),
            json!(6),
            json!(-1),
            json!(1e30),
            json!("x"),
            json!(2.5),
        ] {
            assert!(Quantity::parse(Some(&bad), 5).is_err(), "{bad}");
        }
    }

    /// The codes are the migration's (`20261201000003_order_lifecycle.sql`): stored rows keep
    /// their meaning only if these never change.
    #[test]
    fn order_status_codes_are_the_schemas() {
        let codes: Vec<_> = OrderStatus::STORED.iter().map(|s| s.code()).collect();
        assert_eq!(codes, [Some(0), Some(1), Some(2), Some(3)]);
        for status in OrderStatus::STORED {
            assert_eq!(OrderStatus::from_code(status.code().unwrap()), Some(status));
        }
        assert_eq!(OrderStatus::from_code(4), None);
        assert_eq!(OrderStatus::Pending.code(), None);
        assert_eq!(
            serde_json::to_value(OrderStatus::Cancelled).unwrap(),
            json!("CANCELLED")
        );
    }

    #[test]
    fn order_numbers_name_their_activity() {
        let activity = ActivityId::new(42).unwrap();
        let no = OrderNo::generate(activity);
        assert_eq!(no.activity(), activity);
        assert_eq!(OrderNo::parse(no.as_str()).unwrap(), no);
        for bad in [
            "",
            "42",
            "42-xyz",
            "0-0123456789abcdef0123456789abcdef",
            "a-b",
        ] {
            assert!(OrderNo::parse(bad).is_err(), "{bad}");
        }
    }
}
