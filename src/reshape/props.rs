//! Property tests: what drop and keep guarantee, idempotence of the steps
//! that are idempotent by nature, sparse fieldsets only narrowing, and
//! convert and timestamp round trips.
//!
//! Not every operation can be idempotent, and none of these is tested as
//! one:
//! - `wrap` nests the body one level deeper each time it runs;
//! - `extract` takes the value at its path out again, and that value may
//!   hold the same path (`extract: data` on `{"data": {"data": 1}}`);
//! - `convert` multiplies again (only factor 1 and offset 0 is a no-op);
//! - `timestamp` from one epoch unit to another (or the same) reads its own
//!   output as input, since both are numbers: seconds to millis multiplies
//!   by 1000 each time.
//!
//! `timestamp` between RFC 3339 and an epoch is idempotent, since its output
//! is not in its input notation, and so is `rename` whose paths do not
//! overlap (overlapping ones are refused by [`Step::check`]).

#![allow(
    clippy::unwrap_used,
    reason = "in tests a failed unwrap is the failure report"
)]

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::path::{self, Segment};
use super::*;

/// Few keys, so generated paths often hit generated data; mixed styles so
/// `case` has work to do.
const KEYS: &[&str] = &["a", "b", "c", "a_b", "aB", "x1", "_id"];

/// Biased towards two keys so paths and data meet often.
fn arb_key() -> impl Strategy<Value = String> {
    let common = prop::sample::select(&KEYS[..2]);
    prop_oneof![2 => common, 1 => prop::sample::select(KEYS)].prop_map(str::to_owned)
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-1000i64..1000).prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        prop::sample::select(&["s", "2024-05-01T12:00:00Z"][..]).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(arb_key(), inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Mostly object bodies, as APIs send, with some arrays and scalars.
fn arb_body() -> impl Strategy<Value = Value> {
    let object = || {
        prop::collection::btree_map(arb_key(), arb_json(), 1..6)
            .prop_map(|map| Value::Object(map.into_iter().collect::<Map<_, _>>()))
    };
    let list = prop::collection::vec(object(), 0..4).prop_map(Value::Array);
    prop_oneof![6 => object(), 2 => list, 1 => arb_json()]
}

/// Paths over [`KEYS`] with some `[]`, rendered to text and parsed, so the
/// parser is exercised on every case too.
fn arb_path() -> impl Strategy<Value = Path> {
    let segment = prop_oneof![3 => arb_key().prop_map(Some), 1 => Just(None)];
    prop::collection::vec(segment, 1..4).prop_map(|segments| {
        let mut text = String::new();
        for (i, segment) in segments.into_iter().enumerate() {
            match segment {
                Some(key) if i == 0 => text.push_str(&key),
                Some(key) => {
                    text.push('.');
                    text.push_str(&key);
                }
                None => text.push_str("[]"),
            }
        }
        Path::parse(&text).expect("generated paths are well formed")
    })
}

fn arb_paths() -> impl Strategy<Value = Vec<Path>> {
    prop::collection::vec(arb_path(), 1..4)
}

/// Steps that must give the same result when applied twice.
fn arb_idempotent_step() -> impl Strategy<Value = Step> {
    let separator = prop::sample::select(&[".", "_"][..]).prop_map(str::to_owned);
    prop_oneof![
        arb_paths().prop_map(Step::Keep),
        arb_paths().prop_map(Step::Drop),
        (prop::option::of(arb_path()), any::<bool>())
            .prop_map(|(path, recursive)| Step::DropNulls(DropNulls { path, recursive })),
        (prop::option::of(arb_path()), prop::bool::ANY).prop_map(|(path, camel)| {
            let to = if camel {
                KeyCase::Camel
            } else {
                KeyCase::Snake
            };
            Step::Case(Case { to, path })
        }),
        (prop::option::of(arb_path()), separator)
            .prop_map(|(path, separator)| Step::Flatten(Flatten { path, separator })),
        prop::collection::vec((arb_path(), arb_json()), 1..4).prop_map(|pairs| {
            let mut unique: Vec<(Path, Value)> = Vec::new();
            for (path, value) in pairs {
                if !unique.iter().any(|(seen, _)| *seen == path) {
                    unique.push((path, value));
                }
            }
            Step::Defaults(Defaults(unique))
        }),
    ]
}

/// Timestamp conversions whose output is never in their input notation,
/// plus RFC 3339 to itself, which only normalises to UTC.
fn arb_idempotent_timestamp() -> impl Strategy<Value = Step> {
    use TimeFormat::{EpochMillis, EpochSeconds, Rfc3339};
    let pairs = [
        (Rfc3339, EpochSeconds),
        (Rfc3339, EpochMillis),
        (EpochSeconds, Rfc3339),
        (EpochMillis, Rfc3339),
        (Rfc3339, Rfc3339),
    ];
    (arb_path(), prop::sample::select(pairs.to_vec()))
        .prop_map(|(path, (from, to))| Step::Timestamp(Timestamp { path, from, to }))
}

/// Bodies where timestamps meet the generated paths: instants as RFC 3339
/// text (with offsets and fractions) and as epoch numbers.
fn arb_timed_body() -> impl Strategy<Value = Value> {
    let instant = prop_oneof![
        // Small enough to be valid in any unit, so a conversion between
        // epoch units would show.
        (-100_000i64..100_000).prop_map(Value::from),
        (MIN_MILLIS..MAX_MILLIS).prop_map(Value::from),
        (MIN_MILLIS / 1000..MAX_MILLIS / 1000).prop_map(Value::from),
        (0f64..2e9).prop_map(Value::from),
        prop::sample::select(
            &[
                "2024-05-01T12:00:00Z",
                "2024-05-01T14:00:00.25+02:00",
                "1969-12-31T23:59:59.999Z",
                "not a time",
            ][..]
        )
        .prop_map(Value::from),
    ];
    let element = prop::collection::btree_map(arb_key(), instant.clone(), 0..4)
        .prop_map(|map| Value::Object(map.into_iter().collect::<Map<_, _>>()))
        .boxed();
    let field = prop_oneof![
        instant,
        prop::collection::vec(element.clone(), 0..3).prop_map(Value::Array),
        element,
    ];
    prop::collection::btree_map(arb_key(), field, 1..5)
        .prop_map(|map| Value::Object(map.into_iter().collect::<Map<_, _>>()))
}

/// Renames that [`Step::check`] accepts: key paths, or key paths inside the
/// same array's elements.
fn arb_rename() -> impl Strategy<Value = Step> {
    let keys = || prop::collection::vec(arb_key(), 1..3).prop_map(|keys| keys.join("."));
    let prefix = prop::sample::select(&["", "a[].", "b[]."][..]);
    (prefix, keys(), keys())
        .prop_map(|(prefix, from, to)| {
            Step::Rename(Rename {
                from: Path::parse(&format!("{prefix}{from}")).unwrap(),
                to: Path::parse(&format!("{prefix}{to}")).unwrap(),
            })
        })
        .prop_filter("overlapping renames are refused", |step| {
            step.check().is_ok()
        })
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z in milliseconds: the
/// years RFC 3339 can write.
const MIN_MILLIS: i64 = -62_135_596_800_000;
const MAX_MILLIS: i64 = 253_402_300_799_999;

/// Every node's path, array positions written as `[]`; the root is left
/// out since it always remains.
fn node_paths(value: &Value, prefix: &mut Vec<Segment>, out: &mut Vec<Vec<Segment>>) {
    let children: Vec<(Segment, &Value)> = match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| (Segment::Key(k.clone()), v))
            .collect(),
        Value::Array(items) => items.iter().map(|v| (Segment::Each, v)).collect(),
        _ => Vec::new(),
    };
    for (segment, child) in children {
        prefix.push(segment);
        out.push(prefix.clone());
        node_paths(child, prefix, out);
        prefix.pop();
    }
}

/// True if `small` could be `big` with parts removed: object fields are a
/// subset, array elements a subsequence, scalars equal.
fn contained(small: &Value, big: &Value) -> bool {
    match (small, big) {
        (Value::Object(s), Value::Object(b)) => s
            .iter()
            .all(|(k, v)| b.get(k).is_some_and(|w| contained(v, w))),
        (Value::Array(s), Value::Array(b)) => {
            let mut rest = b.iter();
            s.iter().all(|v| rest.any(|w| contained(v, w)))
        }
        _ => small == big,
    }
}

fn run(steps: &[Step], body: &Value) -> Value {
    let mut body = body.clone();
    apply(steps, &mut body, u64::MAX).unwrap();
    body
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn drop_leaves_none_of_its_paths(body in arb_body(), paths in arb_paths()) {
        let out = run(&[Step::Drop(paths.clone())], &body);
        for p in &paths {
            prop_assert!(!path::exists(&out, p.segments()), "{p} remains in {out}");
        }
    }

    #[test]
    fn keep_leaves_only_its_paths(body in arb_body(), paths in arb_paths()) {
        let out = run(&[Step::Keep(paths.clone())], &body);
        let mut nodes = Vec::new();
        node_paths(&out, &mut Vec::new(), &mut nodes);

        // Each remaining node is under a kept path or an ancestor of one.
        for node in nodes {
            let related = paths.iter().any(|p| {
                let kept = p.segments();
                node.starts_with(kept) || kept.starts_with(&node)
            });
            prop_assert!(related, "{node:?} in {out} is outside {paths:?}");
        }
        prop_assert!(contained(&out, &body) || !out.is_object() && !out.is_array());
    }

    #[test]
    fn steps_are_idempotent(body in arb_body(), step in arb_idempotent_step()) {
        prop_assert!(step.check().is_ok());
        let once = run(std::slice::from_ref(&step), &body);
        let twice = run(std::slice::from_ref(&step), &once);
        prop_assert_eq!(once, twice, "{:?}", step);
    }

    #[test]
    fn rfc3339_and_epoch_conversions_are_idempotent(
        body in arb_timed_body(),
        step in arb_idempotent_timestamp(),
    ) {
        prop_assert!(step.check().is_ok());
        let once = run(std::slice::from_ref(&step), &body);
        let twice = run(std::slice::from_ref(&step), &once);
        prop_assert_eq!(once, twice, "{:?}", step);
    }

    #[test]
    fn non_overlapping_renames_are_idempotent(body in arb_body(), step in arb_rename()) {
        let once = run(std::slice::from_ref(&step), &body);
        let twice = run(std::slice::from_ref(&step), &once);
        prop_assert_eq!(once, twice, "{:?}", step);
    }

    #[test]
    fn timestamps_round_trip_through_rfc3339(
        millis in MIN_MILLIS..=MAX_MILLIS,
        seconds in MIN_MILLIS / 1000..=MAX_MILLIS / 1000,
    ) {
        use TimeFormat::{EpochMillis, EpochSeconds, Rfc3339};
        let at = || Path::parse("at").unwrap();
        let step = |from, to| Step::Timestamp(Timestamp { path: at(), from, to });

        // Epoch to text and back is exact: RFC 3339 keeps the fraction.
        let millis_back = [step(EpochMillis, Rfc3339), step(Rfc3339, EpochMillis)];
        let out = run(&millis_back, &json!({"at": millis}));
        prop_assert_eq!(&out["at"], &json!(millis));
        let seconds_back = [step(EpochSeconds, Rfc3339), step(Rfc3339, EpochSeconds)];
        let out = run(&seconds_back, &json!({"at": seconds}));
        prop_assert_eq!(&out["at"], &json!(seconds));

        // Text to epoch and back gives the same text, in UTC.
        let text = run(&[step(EpochMillis, Rfc3339)], &json!({"at": millis}));
        prop_assert!(text["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{}", text);
        let back = run(&[step(Rfc3339, EpochMillis), step(EpochMillis, Rfc3339)], &text);
        prop_assert_eq!(back, text);
    }

    #[test]
    fn sparse_fields_only_narrow(
        body in arb_body(),
        profile in arb_paths(),
        fields in arb_paths(),
    ) {
        let allowed = run(&[Step::Keep(profile.clone())], &body);
        let narrowed = run(&[Step::Keep(profile), Step::Keep(fields)], &body);
        prop_assert!(contained(&narrowed, &allowed), "{narrowed} not in {allowed}");
    }

    #[test]
    fn convert_round_trips(
        x in -1e9f64..1e9,
        factor in prop_oneof![0.001f64..1.0, 1.0f64..1000.0],
        round in 0u32..6,
    ) {
        let there = Convert { path: Path::parse("v").unwrap(), factor, offset: 0.0, round: None };
        let back = Convert { factor: 1.0 / factor, round: Some(round), ..there.clone() };
        let out = run(&[Step::Convert(there), Step::Convert(back)], &json!({"v": x}));
        let y = out["v"].as_f64().unwrap();

        // Rounding moves it by at most half a unit of the last decimal; the
        // two multiplications add a few ulps.
        let limit = 0.5 * 10f64.powi(-(round as i32)) + x.abs() * 1e-12;
        prop_assert!((x - y).abs() <= limit, "{x} -> {y} (factor {factor}, round {round})");
    }

    #[test]
    fn convert_round_trips_unrounded(x in -1e9f64..1e9, factor in 0.001f64..1000.0) {
        let there = Convert { path: Path::parse("v").unwrap(), factor, offset: 3.5, round: None };
        let back = Convert { factor: 1.0 / factor, offset: -3.5 / factor, ..there.clone() };
        let out = run(&[Step::Convert(there), Step::Convert(back)], &json!({"v": x}));
        let y = out["v"].as_f64().unwrap();
        prop_assert!((x - y).abs() <= x.abs() * 1e-12 + 1e-9, "{x} -> {y}");
    }

    #[test]
    fn parse_never_panics(text in "[a-c.\\[\\]]{0,12}") {
        if let Ok(path) = Path::parse(&text) {
            prop_assert_eq!(path.as_str(), text.as_str());
        }
    }
}
