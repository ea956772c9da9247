//! The one JSON object parser of request bodies: an object only, and no key twice at any depth.
//!
//! serde_json keeps the last of two equal keys (`{"userId":"1","userId":"2"}` is user 2), and a
//! derived struct refuses them: two parsers of one body that disagree on who the buyer is. The
//! gateway and order-service both read the buy path's body through [`parse_object`], so they
//! either agree on every field or both refuse the body. Hand-written because serde_json has no
//! option to refuse duplicate keys (its `Map` insert keeps the last).

use std::fmt;

use serde::de::{self, DeserializeOwned, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::map::Entry;
use serde_json::{Map, Value};

/// Why a body is not a JSON object of the wanted shape.
#[derive(Debug)]
pub enum ObjectError {
    /// Not JSON at all (or cut short).
    Malformed(serde_json::Error),
    /// JSON, but not an object, or an object with a key twice.
    NotAnObject(serde_json::Error),
    /// An object of the wrong shape for the wanted type.
    DoesNotFit(serde_json::Error),
}

impl ObjectError {
    /// Whether the body was well-formed JSON (so the error is about its content).
    pub fn is_malformed(&self) -> bool {
        matches!(self, Self::Malformed(_))
    }
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(e) => write!(f, "the body is not valid JSON: {e}"),
            Self::NotAnObject(e) => write!(f, "the body must be one JSON object: {e}"),
            Self::DoesNotFit(e) => write!(f, "the body does not fit: {e}"),
        }
    }
}

/// Parses `body` as one JSON object without duplicate keys, then reads it into `T` by field name
/// (an array is never read into a struct by position).
pub fn parse_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, ObjectError> {
    let StrictObject(object) = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            ObjectError::NotAnObject(e)
        } else {
            ObjectError::Malformed(e)
        }
    })?;
    serde_json::from_value(Value::Object(object)).map_err(ObjectError::DoesNotFit)
}

/// A JSON object whose keys, and those of every object inside it, are unique (for extractors
/// that parse the body themselves, such as `axum::Json`).
#[derive(Debug, Clone, PartialEq)]
pub struct StrictObject(pub Map<String, Value>);

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match deserializer.deserialize_map(StrictVisitor("a JSON object"))? {
            Value::Object(object) => Ok(Self(object)),
            _ => Err(de::Error::custom("expected an object")),
        }
    }
}

/// Any JSON value, refusing an object with a key twice.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(StrictVisitor("a JSON value"))
            .map(Self)
    }
}

/// Builds a [`Value`]; says what it expected (`.0`) when given something else.
struct StrictVisitor(&'static str);

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // serde_json hands finite numbers only; a NaN cannot be written in JSON.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(value) = map.next_value()?;
            match object.entry(key) {
                Entry::Vacant(slot) => {
                    slot.insert(value);
                }
                Entry::Occupied(slot) => {
                    return Err(de::Error::custom(format_args!(
                        "the key {:?} appears twice",
                        slot.key()
                    )));
                }
            }
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    struct Order {
        user_id: Option<Value>,
        quantity: Option<Value>,
    }

    #[test]
    fn an_object_is_read_by_field_name() {
        let order: Order = parse_object(br#"{"userId":"7","quantity":1,"extra":[1,{"a":null}]}"#)
            .expect("a plain object");
        assert_eq!(
            order,
            Order {
                user_id: Some("7".into()),
                quantity: Some(1.into())
            }
        );
    }

    #[test]
    fn a_key_twice_is_refused_at_any_depth() {
        for body in [
            r#"{"userId":"1","userId":"2"}"#,
            r#"{"userId":"1","quantity":1,"userId":"1"}"#,
            r#"{"userId":"1","extra":{"a":1,"a":2}}"#,
            r#"{"userId":"1","extra":[{"a":1,"a":1}]}"#,
        ] {
            let error = parse_object::<Order>(body.as_bytes()).expect_err(body);
            assert!(
                matches!(error, ObjectError::NotAnObject(_)),
                "{body}: {error}"
            );
            assert!(error.to_string().contains("appears twice"), "{error}");
        }
    }

    #[test]
    fn other_bodies_are_told_apart() {
        for body in ["{\"userId\":", "not json"] {
            let error = parse_object::<Order>(body.as_bytes()).expect_err(body);
            assert!(error.is_malformed(), "{body}: {error:?}");
        }
        let error = parse_object::<Order>(b"[1,2,3]").expect_err("an array");
        assert!(matches!(error, ObjectError::NotAnObject(_)), "{error:?}");
        let error = parse_object::<Vec<i32>>(br#"{"a":1}"#).expect_err("a map is no list");
        assert!(matches!(error, ObjectError::DoesNotFit(_)), "{error:?}");
    }
}
