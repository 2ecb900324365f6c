//! Reading and writing instants for the `timestamp` step, on top of the
//! `time` crate so RFC 3339 edge cases are not ours to get right.

use serde_json::{Number, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::step::TimeFormat;

/// Rewrites one value, or returns `None` when it is not an instant in the
/// `from` notation (wrong type, bad text, out of range) so the caller keeps
/// it as it was.
pub(crate) fn convert(value: &Value, from: TimeFormat, to: TimeFormat) -> Option<Value> {
    let instant = read(value, from)?;
    write(instant, to)
}

fn read(value: &Value, format: TimeFormat) -> Option<OffsetDateTime> {
    match format {
        TimeFormat::Rfc3339 => OffsetDateTime::parse(value.as_str()?, &Rfc3339).ok(),
        TimeFormat::EpochSeconds => from_units(value.as_number()?, 1_000_000_000),
        TimeFormat::EpochMillis => from_units(value.as_number()?, 1_000_000),
    }
}

/// `nanos_per_unit` scales the number to nanoseconds. Integers are exact;
/// floats are rounded to the microsecond, about what an f64 epoch holds.
fn from_units(number: &Number, nanos_per_unit: i128) -> Option<OffsetDateTime> {
    let nanos = if let Some(units) = number.as_i64() {
        i128::from(units).checked_mul(nanos_per_unit)?
    } else {
        let units = number.as_f64()?;
        let micros = (units * (nanos_per_unit as f64 / 1_000.0)).round();

        // Out-of-range floats would saturate in the cast; the range check
        // in `time` then refuses anything that is not a real instant.
        if !micros.is_finite() || micros.abs() > 1e20 {
            return None;
        }
        (micros as i128).checked_mul(1_000)?
    };
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

fn write(instant: OffsetDateTime, format: TimeFormat) -> Option<Value> {
    let nanos = instant.unix_timestamp_nanos();
    match format {
        TimeFormat::Rfc3339 => {
            let utc = instant.to_offset(time::UtcOffset::UTC);
            utc.format(&Rfc3339).ok().map(Value::String)
        }
        TimeFormat::EpochSeconds => to_units(nanos, 1_000_000_000),
        TimeFormat::EpochMillis => to_units(nanos, 1_000_000),
    }
}

/// Whole units come out as integers; a remainder makes a float, so a
/// millisecond instant written as seconds keeps its fraction.
fn to_units(nanos: i128, nanos_per_unit: i128) -> Option<Value> {
    let whole = i64::try_from(nanos.div_euclid(nanos_per_unit)).ok()?;
    let rest = nanos.rem_euclid(nanos_per_unit);
    if rest == 0 {
        return Some(Value::from(whole));
    }

    // Whole and fraction are converted apart so the fraction keeps its
    // digits instead of being lost in a 19-digit nanosecond count.
    let units = whole as f64 + rest as f64 / nanos_per_unit as f64;
    Number::from_f64(units).map(Value::Number)
}
