//! Numbers and booleans as YAML 1.2 writes them, unquoted, and nothing else.
//!
//! serde-saphyr reads a number field from any scalar that parses as one,
//! quoted or padded (`"20"`, `' 20 '`), with `_` separators (`2_0`), and a
//! boolean from YAML 1.1's `yes`, `on` or `off`. Fields marked
//! `#[serde(deserialize_with = "strict")]` are read through the parser's
//! own type inference instead, so a quoted number is a string and refused.

use std::fmt;
use std::num::NonZeroU64;

use serde::Deserialize;
use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde_saphyr::Spanned;

/// What a mistyped integer is told it should be.
const INTEGER: &str = "an integer (unquoted)";

/// Reads a field of type `T` strictly: `#[serde(deserialize_with = "strict")]`.
///
/// # Errors
///
/// A value of another YAML type than `T`'s, such as a quoted number.
pub(crate) fn strict<'de, D: Deserializer<'de>, T: Strict>(deserializer: D) -> Result<T, D::Error> {
    T::strict(deserializer)
}

/// A type read only from the YAML type it stands for.
pub(crate) trait Strict: Sized {
    /// Reads `Self` from one YAML node, refusing a scalar of another type.
    fn strict<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error>;
}

/// Lets `Spanned` and `Option` read their inner value strictly.
struct Inner<T>(T);

impl<'de, T: Strict> Deserialize<'de> for Inner<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::strict(deserializer).map(Inner)
    }
}

impl<T: Strict> Strict for Spanned<T> {
    fn strict<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Inner<T>>::deserialize(deserializer)?;
        Ok(Spanned::new(
            spanned.value.0,
            spanned.referenced,
            spanned.defined,
        ))
    }
}

impl<T: Strict> Strict for Option<T> {
    fn strict<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let inner = Option::<Inner<T>>::deserialize(deserializer)?;
        Ok(inner.map(|inner| inner.0))
    }
}

// === integers ===

impl Strict for u64 {
    fn strict<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Integer)
    }
}

impl Strict for u32 {
    fn strict<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u64::strict(deserializer)?;
        u32::try_from(value).map_err(|_| {
            de::Error::invalid_value(Unexpected::Unsigned(value), &"an integer below 2^32")
        })
    }
}

impl Strict for usize {
    fn strict<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u64::strict(deserializer)?;
        usize::try_from(value).map_err(|_| {
            de::Error::invalid_value(Unexpected::Unsigned(value), &"a smaller integer")
        })
    }
}

impl Strict for NonZeroU64 {
    fn strict<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u64::strict(deserializer)?;
        NonZeroU64::new(value).ok_or_else(|| {
            de::Error::invalid_value(Unexpected::Unsigned(value), &"an integer of at least 1")
        })
    }
}

/// A non-negative integer that the parser inferred as one.
struct Integer;

impl Visitor<'_> for Integer {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(INTEGER)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        Ok(value)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        u64::try_from(value)
            .map_err(|_| E::invalid_value(Unexpected::Signed(value), &"an integer of 0 or more"))
    }

    fn visit_u128<E: de::Error>(self, value: u128) -> Result<u64, E> {
        u64::try_from(value).map_err(|_| E::custom(format!("{value} is larger than {}", u64::MAX)))
    }

    fn visit_i128<E: de::Error>(self, value: i128) -> Result<u64, E> {
        u64::try_from(value)
            .map_err(|_| E::custom(format!("{value} is not an integer from 0 to {}", u64::MAX)))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<u64, E> {
        Err(E::invalid_type(Unexpected::Float(value), &self))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<u64, E> {
        Err(E::invalid_type(Unexpected::Str(value), &self))
    }
}

// === booleans and decimals ===

impl Strict for bool {
    fn strict<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Boolean)
    }
}

/// `true` or `false` as the parser inferred them (YAML 1.2 also allows
/// `True`, `TRUE`, `False` and `FALSE`).
struct Boolean;

impl Visitor<'_> for Boolean {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("true or false (unquoted)")
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<bool, E> {
        Ok(value)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<bool, E> {
        Err(E::invalid_type(Unexpected::Str(value), &self))
    }
}

impl Strict for f64 {
    fn strict<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Decimal)
    }
}

/// A number the parser inferred as one; an integer is a number too.
struct Decimal;

impl Visitor<'_> for Decimal {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number (unquoted)")
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<f64, E> {
        Ok(value)
    }

    // Integers in config are small; the nearest f64 is what was meant.
    #[allow(clippy::cast_precision_loss)]
    fn visit_u64<E: de::Error>(self, value: u64) -> Result<f64, E> {
        Ok(value as f64)
    }

    #[allow(clippy::cast_precision_loss)]
    fn visit_i64<E: de::Error>(self, value: i64) -> Result<f64, E> {
        Ok(value as f64)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<f64, E> {
        Err(E::invalid_type(Unexpected::Str(value), &self))
    }
}
