//! Unit tests: path parsing, config forms, and each step on objects and on
//! arrays of objects, plus hostile input.

#![allow(
    clippy::unwrap_used,
    reason = "in tests a failed unwrap is the failure report"
)]

use serde_json::{Value, json};

use super::*;

/// Steps from the JSON spelling of their YAML form.
fn steps(text: &str) -> Vec<Step> {
    serde_json::from_str(text).expect("test steps deserialize")
}

fn run(steps_text: &str, mut body: Value) -> Value {
    let steps = steps(steps_text);
    validate(&steps).expect("test steps are valid");
    apply(&steps, &mut body, u64::MAX).unwrap();
    body
}

/// Builds an object by moving the values in; `json!` would serialize them
/// recursively, which deep test values cannot survive.
fn object(fields: Vec<(&str, Value)>) -> Value {
    Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn path(text: &str) -> Path {
    Path::parse(text).expect("test path parses")
}

fn key(name: &str) -> Segment {
    Segment::Key(name.to_owned())
}

// === paths ===

#[test]
fn parses_keys_and_arrays() {
    assert_eq!(path("id").segments(), [key("id")]);
    assert_eq!(path("battery.soc").segments(), [key("battery"), key("soc")]);
    assert_eq!(
        path("items[].connectors[].type").segments(),
        [
            key("items"),
            Segment::Each,
            key("connectors"),
            Segment::Each,
            key("type")
        ]
    );
    assert_eq!(path("[].id").segments(), [Segment::Each, key("id")]);
    assert_eq!(path("[]").segments(), [Segment::Each]);
    assert_eq!(
        path("grid[][]").segments(),
        [key("grid"), Segment::Each, Segment::Each]
    );
    assert_eq!(path("odd key-é:$").segments(), [key("odd key-é:$")]);
    assert_eq!(path("a.b").to_string(), "a.b");
}

#[test]
fn rejects_malformed_paths() {
    let cases = [
        ("", 0, PathProblem::Empty),
        ("a..b", 2, PathProblem::EmptySegment),
        (".a", 0, PathProblem::EmptySegment),
        ("a.", 2, PathProblem::EmptySegment),
        ("a[", 1, PathProblem::UnbalancedBracket),
        ("a]", 1, PathProblem::UnbalancedBracket),
        ("a[]]", 3, PathProblem::UnbalancedBracket),
        ("a.b[0]", 3, PathProblem::BracketContent),
        ("a[*].b", 1, PathProblem::BracketContent),
        ("a[]b", 3, PathProblem::TextAfterBrackets),
        ("a.[]", 2, PathProblem::BracketWithoutKey),
    ];
    for (text, at, problem) in cases {
        let err = Path::parse(text).expect_err(text);
        assert_eq!((err.at, err.problem), (at, problem), "{text}");
    }

    let long = vec!["k"; MAX_DEPTH + 1].join(".");
    assert_eq!(
        Path::parse(&long).unwrap_err().problem,
        PathProblem::TooLong
    );
    assert!(Path::parse(&vec!["k"; MAX_DEPTH].join(".")).is_ok());
}

#[test]
fn path_error_quotes_the_path() {
    let err = Path::parse("a..b").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid path `a..b` at byte 2: empty segment between dots"
    );

    let err = serde_json::from_str::<Path>(r#""items[0].id""#).unwrap_err();
    assert!(err.to_string().contains("`items[0].id`"), "{err}");
}

#[test]
fn sparse_fieldset_parses_and_narrows() {
    let fields = sparse_fieldset("id, battery.soc").unwrap();
    assert_eq!(fields, [path("id"), path("battery.soc")]);

    assert_eq!(sparse_fieldset("").unwrap_err().problem, PathProblem::Empty);
    assert_eq!(
        sparse_fieldset("id,,soc").unwrap_err().problem,
        PathProblem::Empty
    );
    assert_eq!(
        sparse_fieldset("id,a..b").unwrap_err().problem,
        PathProblem::EmptySegment
    );

    // The caller appends the fields as one more keep: it can only narrow.
    let mut profile = steps(r#"[{"keep": ["id", "battery"]}]"#);
    profile.push(Step::Keep(sparse_fieldset("battery.soc,secret").unwrap()));
    let mut body = json!({"id": 1, "secret": "s", "battery": {"soc": 80, "temp": 20}});
    apply(&profile, &mut body, u64::MAX).unwrap();
    assert_eq!(body, json!({"battery": {"soc": 80}}));
}

// === config forms ===

#[test]
fn deserializes_every_step_form() {
    let parsed = steps(
        r#"[
            {"keep": ["id", "items[].battery.soc"]},
            {"drop": ["internal"]},
            {"rename": {"from": "soc", "to": "battery.soc"}},
            {"extract": "data"},
            {"wrap": "data"},
            {"flatten": {"path": "battery", "separator": "_"}},
            {"flatten": {}},
            {"flatten": null},
            {"drop_nulls": {"recursive": false}},
            {"drop_nulls": {}},
            {"drop_nulls": null},
            {"defaults": {"status": "unknown", "items[].tags": []}},
            {"convert": {"path": "energy_wh", "factor": 0.001, "round": 2}},
            {"convert": {"path": "temp", "offset": -273.15}},
            {"timestamp": {"path": "seen_at", "from": "epoch_millis", "to": "rfc3339"}},
            {"case": {"to": "camel"}},
            {"case": {"to": "snake", "path": "data"}}
        ]"#,
    );
    assert_eq!(parsed.len(), 17);
    validate(&parsed).unwrap();

    assert_eq!(
        parsed[7],
        Step::Flatten(Flatten {
            path: None,
            separator: ".".into()
        })
    );
    let recursive = DropNulls {
        path: None,
        recursive: true,
    };
    assert_eq!(parsed[9], Step::DropNulls(recursive.clone()));
    assert_eq!(parsed[10], Step::DropNulls(recursive));
    let Step::Defaults(defaults) = &parsed[11] else {
        panic!("defaults")
    };
    assert_eq!(defaults.0[0], (path("status"), json!("unknown")));
    let Step::Convert(convert) = &parsed[13] else {
        panic!("convert")
    };
    assert_eq!(
        (convert.factor, convert.offset, convert.round),
        (1.0, -273.15, None)
    );
}

#[test]
fn rejects_unknown_keys_and_bad_values() {
    let bad = [
        (r#"[{"keep": ["a..b"]}]"#, "`a..b`"),
        (
            r#"[{"rename": {"from": "a", "to": "b", "extra": 1}}]"#,
            "unknown field `extra`",
        ),
        (
            r#"[{"convert": {"path": "a", "factr": 2}}]"#,
            "unknown field `factr`",
        ),
        (
            r#"[{"drop_nulls": {"recurse": true}}]"#,
            "unknown field `recurse`",
        ),
        (r#"[{"explode": "a"}]"#, "unknown variant `explode`"),
        (r#"[{"keep": ["a"], "drop": ["b"]}]"#, ""),
        (
            r#"[{"timestamp": {"path": "t", "from": "iso", "to": "rfc3339"}}]"#,
            "`iso`",
        ),
        (r#"[{"case": {"to": "kebab"}}]"#, "`kebab`"),
        (
            r#"[{"defaults": {"a": 1, "a": 2}}]"#,
            "defaults lists `a` twice",
        ),
    ];
    for (text, needle) in bad {
        let err = serde_json::from_str::<Vec<Step>>(text).expect_err(text);
        assert!(err.to_string().contains(needle), "{text}: {err}");
    }
}

#[test]
fn validate_names_the_failing_step() {
    let cases = [
        (r#"{"keep": []}"#, "keep lists no paths"),
        (
            r#"{"rename": {"from": "items[].a", "to": "b"}}"#,
            "crosses an array",
        ),
        (
            r#"{"rename": {"from": "a[].b", "to": "c[].b"}}"#,
            "crosses an array",
        ),
        (r#"{"rename": {"from": "a", "to": "b[]"}}"#, "ends in `[]`"),
        (
            r#"{"rename": {"from": "a", "to": "a.b"}}"#,
            "rename from `a` to `a.b` overlaps",
        ),
        (
            r#"{"rename": {"from": "a.b", "to": "a"}}"#,
            "rename from `a.b` to `a` overlaps",
        ),
        (
            r#"{"rename": {"from": "items[].a", "to": "items[].a.b"}}"#,
            "overlaps",
        ),
        (r#"{"rename": {"from": "a", "to": "a"}}"#, "overlaps"),
        (r#"{"wrap": ""}"#, "wrap key is empty"),
        (r#"{"flatten": {"separator": ""}}"#, "separator is empty"),
        (
            r#"{"convert": {"path": "a", "round": 16}}"#,
            "above the maximum of 15",
        ),
    ];
    for (step, needle) in cases {
        let list = steps(&format!(r#"[{{"drop": ["x"]}}, {step}]"#));
        let err = validate(&list).expect_err(step);
        assert_eq!(err.index, 1);
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("[1].{}: ", list[1].op())),
            "{text}"
        );
        assert!(text.contains(needle), "{text}");
    }

    let nan = Step::Convert(Convert {
        path: path("a"),
        factor: f64::NAN,
        offset: 0.0,
        round: None,
    });
    assert_eq!(nan.check(), Err(StepProblem::NotFinite("factor")));
    let ok = steps(r#"[{"rename": {"from": "items[].a", "to": "items[].b.c"}}]"#);
    validate(&ok).unwrap();
}

// === keep and drop ===

#[test]
fn keep_on_objects() {
    let body = json!({"id": 1, "name": "n", "battery": {"soc": 80, "temp": 20}, "tags": [1]});
    assert_eq!(
        run(r#"[{"keep": ["id", "battery.soc"]}]"#, body.clone()),
        json!({"id": 1, "battery": {"soc": 80}})
    );
    assert_eq!(
        run(r#"[{"keep": ["battery"]}]"#, body.clone()),
        json!({"battery": {"soc": 80, "temp": 20}})
    );
    assert_eq!(run(r#"[{"keep": ["missing"]}]"#, body), json!({}));
}

#[test]
fn keep_through_arrays() {
    let body = json!({
        "total": 2,
        "items": [
            {
                "id": 1,
                "battery": {"soc": 80, "temp": 20},
                "connectors": [{"type": "ccs", "kw": 50}],
            },
            {"id": 2, "battery": null, "connectors": []},
            "stray",
        ]
    });
    assert_eq!(
        run(
            r#"[{"keep": ["items[].battery.soc", "items[].connectors[].type"]}]"#,
            body
        ),
        json!({"items": [
            {"battery": {"soc": 80}, "connectors": [{"type": "ccs"}]},
            {"connectors": []},
        ]})
    );

    let list = json!([{"id": 1, "x": 2}, {"id": 3}]);
    assert_eq!(
        run(r#"[{"keep": ["[].id"]}]"#, list.clone()),
        json!([{"id": 1}, {"id": 3}])
    );

    // A shape the paths do not expect is emptied rather than leaked.
    assert_eq!(run(r#"[{"keep": ["id"]}]"#, list), json!([]));
    assert_eq!(
        run(r#"[{"keep": ["items[].id"]}]"#, json!({"items": {"id": 1}})),
        json!({})
    );
}

#[test]
fn drop_on_objects_and_arrays() {
    let body = json!({"id": 1, "debug": {"trace": "t"}, "items": [{"a": 1, "b": 2}, {"b": 3}, 4]});
    assert_eq!(
        run(
            r#"[{"drop": ["debug", "items[].b", "missing.deep"]}]"#,
            body.clone()
        ),
        json!({"id": 1, "items": [{"a": 1}, {}, 4]})
    );
    assert_eq!(
        run(r#"[{"drop": ["items[]"]}]"#, body),
        json!({"id": 1, "debug": {"trace": "t"}, "items": []})
    );
    assert_eq!(
        run(r#"[{"drop": ["[].x"]}]"#, json!([{"x": 1, "y": 2}])),
        json!([{"y": 2}])
    );
}

// === rename, extract, wrap ===

#[test]
fn rename_moves_fields() {
    let body = json!({"soc": 80, "battery": {"temp": 20}});
    assert_eq!(
        run(
            r#"[{"rename": {"from": "soc", "to": "battery.soc"}}]"#,
            body.clone()
        ),
        json!({"battery": {"temp": 20, "soc": 80}})
    );
    assert_eq!(
        run(
            r#"[{"rename": {"from": "battery.temp", "to": "meta.temp_c"}}]"#,
            body.clone()
        ),
        json!({"soc": 80, "battery": {}, "meta": {"temp_c": 20}})
    );

    // Missing source: nothing happens. Blocked destination: nothing moves.
    assert_eq!(
        run(r#"[{"rename": {"from": "nope", "to": "x"}}]"#, body.clone()),
        body
    );
    assert_eq!(
        run(
            r#"[{"rename": {"from": "battery", "to": "soc.b"}}]"#,
            body.clone()
        ),
        body
    );

    // An existing destination is overwritten.
    assert_eq!(
        run(r#"[{"rename": {"from": "soc", "to": "battery"}}]"#, body),
        json!({"battery": 80})
    );
}

#[test]
fn rename_within_array_elements() {
    let body = json!({"items": [{"soc": 1}, {"soc": 2, "battery": {}}, {"other": 3}, 7]});
    assert_eq!(
        run(
            r#"[{"rename": {"from": "items[].soc", "to": "items[].battery.soc"}}]"#,
            body
        ),
        json!({"items": [
            {"battery": {"soc": 1}},
            {"battery": {"soc": 2}},
            {"other": 3},
            7,
        ]})
    );

    // Invalid renames built in code are skipped by apply, not half done.
    let across = steps(r#"[{"rename": {"from": "items[].a", "to": "a"}}]"#);
    let mut body = json!({"items": [{"a": 1}]});
    apply(&across, &mut body, u64::MAX).unwrap();
    assert_eq!(body, json!({"items": [{"a": 1}]}));
}

#[test]
fn overlapping_renames_are_refused_and_skipped() {
    let body = json!({"a": {"b": 1, "c": 2}, "ab": 3});
    for (from, to) in [("a", "a.b"), ("a.b", "a"), ("a", "a")] {
        let rename = Step::Rename(Rename {
            from: path(from),
            to: path(to),
        });
        assert!(
            matches!(rename.check(), Err(StepProblem::RenameOverlaps { .. })),
            "{from} -> {to}"
        );

        // Without the check, `a -> a.b` would nest once more on every run
        // and `a.b -> a` would lose `a.c`; skipped, the body stays whole.
        let mut twice = body.clone();
        let steps = [rename.clone(), rename];
        apply(&steps, &mut twice, u64::MAX).unwrap();
        assert_eq!(twice, body, "{from} -> {to}");
    }

    // A key that merely starts with the same letters is another field.
    assert_eq!(
        run(r#"[{"rename": {"from": "a", "to": "ab"}}]"#, body),
        json!({"ab": {"b": 1, "c": 2}})
    );
}

#[test]
fn extract_replaces_the_body() {
    let body = json!({"data": {"items": [{"id": 1}, {"id": 2}, {"x": 0}]}, "meta": {}});
    assert_eq!(
        run(r#"[{"extract": "data.items"}]"#, body.clone()),
        json!([{"id": 1}, {"id": 2}, {"x": 0}])
    );
    assert_eq!(
        run(r#"[{"extract": "data.items[].id"}]"#, body.clone()),
        json!([1, 2])
    );
    assert_eq!(run(r#"[{"extract": "data.nothing"}]"#, body.clone()), body);
    assert_eq!(run(r#"[{"extract": "meta[].id"}]"#, body.clone()), body);
    assert_eq!(
        run(r#"[{"extract": "[].a"}]"#, json!([{"a": 1}, {"a": 2}])),
        json!([1, 2])
    );
}

#[test]
fn wrap_nests_the_body() {
    assert_eq!(
        run(r#"[{"wrap": "data"}]"#, json!([1, 2])),
        json!({"data": [1, 2]})
    );
    assert_eq!(
        run(
            r#"[{"extract": "a"}, {"wrap": "b"}]"#,
            json!({"a": {"x": 1}})
        ),
        json!({"b": {"x": 1}})
    );
}

// === flatten, drop_nulls, case ===

#[test]
fn flatten_joins_keys() {
    let body =
        json!({"id": 1, "battery": {"soc": 80, "cell": {"v": 3.7}}, "tags": [{"a": {}}], "e": {}});
    assert_eq!(
        run(r#"[{"flatten": {}}]"#, body.clone()),
        json!({"id": 1, "battery.soc": 80, "battery.cell.v": 3.7, "tags": [{"a": {}}], "e": {}})
    );
    assert_eq!(
        run(
            r#"[{"flatten": {"path": "battery", "separator": "_"}}]"#,
            body
        ),
        json!({"id": 1, "battery": {"soc": 80, "cell_v": 3.7}, "tags": [{"a": {}}], "e": {}})
    );

    let list = json!({"items": [{"a": {"b": 1}}, {"a": 2}, 3]});
    assert_eq!(
        run(
            r#"[{"flatten": {"path": "items[]", "separator": "_"}}]"#,
            list
        ),
        json!({"items": [{"a_b": 1}, {"a": 2}, 3]})
    );

    // On a clash the field met first in the object's order wins.
    let clash = json!({"a": {"b": 1}, "a.b": 2});
    assert_eq!(run(r#"[{"flatten": {}}]"#, clash), json!({"a.b": 1}));
}

/// `n` leaves named `k0`, `k1`, ... under one key of `key_bytes` bytes.
fn long_key_over_leaves(key_bytes: usize, n: usize) -> Value {
    let leaves: serde_json::Map<String, Value> =
        (0..n).map(|i| (format!("k{i}"), json!(0))).collect();
    object(vec![(&"p".repeat(key_bytes), Value::Object(leaves))])
}

#[test]
fn flatten_stops_at_the_budget_before_building_anything() {
    // 400 KB on the wire; flattened, 20k copies of the 200 KB key: 4 GB.
    let text = serde_json::to_vec(&long_key_over_leaves(200_000, 20_000)).unwrap();
    assert!(text.len() < 410_000, "{}", text.len());
    let steps = steps(r#"[{"flatten": {}}]"#);

    let limit = 2 * 1024 * 1024;
    let err = apply_to_bytes(&steps, &text, limit).unwrap_err();
    assert!(
        matches!(err, BodyError::TooLarge(TooLarge { limit: l }) if l == limit),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "reshaped body would be larger than 2097152 bytes"
    );

    // The parsed body is left as it was: the keys are measured first.
    let mut body = long_key_over_leaves(200_000, 20_000);
    assert!(apply(&steps, &mut body, limit).is_err());
    assert_eq!(body.as_object().unwrap().len(), 1);
    assert_eq!(
        body[&"p".repeat(200_000)].as_object().unwrap().len(),
        20_000
    );
}

#[test]
fn the_flatten_budget_counts_every_key_it_writes() {
    // "a.b" and "a.c": six bytes of keys.
    let steps = steps(r#"[{"flatten": {}}]"#);
    let mut body = json!({"a": {"b": 1, "c": 2}});
    apply(&steps, &mut body, 6).unwrap();
    assert_eq!(body, json!({"a.b": 1, "a.c": 2}));

    let mut body = json!({"a": {"b": 1, "c": 2}});
    assert_eq!(apply(&steps, &mut body, 5), Err(TooLarge { limit: 5 }));
}

#[test]
fn the_flatten_budget_is_shared_by_every_element_a_step_reaches() {
    // Each element alone is within 2 MiB (1000 keys of about 1 KB), but
    // the 100 together would write 100 MB.
    let items: Vec<Value> = (0..100).map(|_| long_key_over_leaves(1000, 1000)).collect();
    let mut body = object(vec![("items", Value::Array(items))]);
    let each = steps(r#"[{"flatten": {"path": "items[]"}}]"#);
    assert!(apply(&each, &mut body, 2 * 1024 * 1024).is_err());
    ops::discard(body);

    // Each step has a budget of its own: "x.y" twice fits 3 bytes each.
    let twice = steps(r#"[{"flatten": {"path": "a"}}, {"flatten": {"path": "b"}}]"#);
    let mut body = json!({"a": {"x": {"y": 1}}, "b": {"x": {"y": 1}}});
    apply(&twice, &mut body, 3).unwrap();
    assert_eq!(body, json!({"a": {"x.y": 1}, "b": {"x.y": 1}}));

    // One step reaching both objects shares it: 6 bytes do not fit in 5.
    let both = steps(r#"[{"flatten": {"path": "items[]"}}]"#);
    let mut body = json!({"items": [{"x": {"y": 1}}, {"x": {"y": 1}}]});
    assert!(apply(&both, &mut body, 5).is_err());
    let mut body = json!({"items": [{"x": {"y": 1}}, {"x": {"y": 1}}]});
    apply(&both, &mut body, 6).unwrap();
}

#[test]
fn the_written_result_is_bounded_too() {
    let steps = steps(r#"[{"wrap": "data"}]"#);
    let body = br#"{"id": 7}"#;

    let out = apply_to_bytes(&steps, body, 17).unwrap();
    assert_eq!(out, br#"{"data":{"id":7}}"#);
    let err = apply_to_bytes(&steps, body, 16).unwrap_err();
    assert!(matches!(err, BodyError::TooLarge(_)), "{err}");
}

#[test]
fn drop_nulls_cleans_objects() {
    let body = json!({"a": null, "b": {"c": null, "d": 1}, "list": [null, {"e": null}]});
    assert_eq!(
        run(r#"[{"drop_nulls": {}}]"#, body.clone()),
        json!({"b": {"d": 1}, "list": [null, {}]})
    );
    assert_eq!(
        run(r#"[{"drop_nulls": {"recursive": false}}]"#, body.clone()),
        json!({"b": {"c": null, "d": 1}, "list": [null, {"e": null}]})
    );
    assert_eq!(
        run(r#"[{"drop_nulls": {"path": "list[]"}}]"#, body),
        json!({"a": null, "b": {"c": null, "d": 1}, "list": [null, {}]})
    );
}

#[test]
fn case_converts_keys() {
    let body =
        json!({"battery_soc": 1, "items": [{"connector_type": "ccs", "_id": 2}], "line_1": 3});
    let camel = run(r#"[{"case": {"to": "camel"}}]"#, body.clone());
    assert_eq!(
        camel,
        json!({"batterySoc": 1, "items": [{"connectorType": "ccs", "_id": 2}], "line1": 3})
    );
    assert_eq!(
        run(r#"[{"case": {"to": "snake"}}]"#, camel),
        json!({
            "battery_soc": 1, "items": [{"connector_type": "ccs", "_id": 2}], "line1": 3
        })
    );

    assert_eq!(
        run(
            r#"[{"case": {"to": "snake"}}]"#,
            json!({"HTTPStatus": 1, "userID": 2, "a1B": 3})
        ),
        json!({"http_status": 1, "user_id": 2, "a1_b": 3})
    );
    assert_eq!(
        run(r#"[{"case": {"to": "camel", "path": "items[]"}}]"#, body),
        json!({"battery_soc": 1, "items": [{"connectorType": "ccs", "_id": 2}], "line_1": 3})
    );

    // The key already in the target style wins a clash.
    let clash = json!({"foo_bar": 1, "fooBar": 2});
    assert_eq!(
        run(r#"[{"case": {"to": "camel"}}]"#, clash.clone()),
        json!({"fooBar": 2})
    );
    assert_eq!(
        run(r#"[{"case": {"to": "snake"}}]"#, clash),
        json!({"foo_bar": 1})
    );
}

// === defaults, convert, timestamp ===

#[test]
fn defaults_fill_missing_and_null() {
    let body = json!({"status": null, "name": "n", "items": [{"tags": null}, {"tags": ["x"]}, 5]});
    let step = r#"[{"defaults": {"status": "x", "name": "z", "meta.v": 1, "items[].tags": []}}]"#;
    assert_eq!(
        run(step, body),
        json!({
            "status": "x",
            "name": "n",
            "meta": {"v": 1},
            "items": [{"tags": []}, {"tags": ["x"]}, 5]
        })
    );

    // No array is invented, and a non-object on the way is left alone.
    assert_eq!(
        run(r#"[{"defaults": {"items[].a": 1}}]"#, json!({})),
        json!({})
    );
    assert_eq!(
        run(r#"[{"defaults": {"a.b": 1}}]"#, json!({"a": 3})),
        json!({"a": 3})
    );
}

#[test]
fn defaults_stop_at_the_budget_over_a_big_array() {
    // 10,000 empty elements (30 KB) each asking for a 1 KB default: 10 MB
    // for a budget of 64 KiB.
    let items: Vec<Value> = (0..10_000).map(|_| json!({})).collect();
    let mut body = object(vec![("items", Value::Array(items))]);
    let pad = format!(
        r#"[{{"defaults": {{"items[].pad": "{}"}}}}]"#,
        "x".repeat(1000)
    );
    let grows = steps(&pad);

    let limit = 64 * 1024;
    assert_eq!(apply(&grows, &mut body, limit), Err(TooLarge { limit }));

    // The step stopped as soon as the budget ran out: each fill costs
    // 1009 bytes (key, its quotes, colon and comma, and the quoted value).
    let filled = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["pad"].is_string())
        .count();
    assert_eq!(filled, 64);

    let text = serde_json::to_vec(&json!({"items": [{}, {}, {}]})).unwrap();
    let err = apply_to_bytes(&grows, &text, 3000).unwrap_err();
    assert!(matches!(err, BodyError::TooLarge(_)), "{err}");
}

#[test]
fn the_defaults_budget_counts_every_field_it_adds() {
    // `meta` (4 + 4 + 2 for its braces), then `v` (1 + 4) and `1`: 16.
    let nested = steps(r#"[{"defaults": {"meta.v": 1}}]"#);
    let mut body = json!({});
    apply(&nested, &mut body, 16).unwrap();
    assert_eq!(body, json!({"meta": {"v": 1}}));
    let mut body = json!({});
    assert_eq!(apply(&nested, &mut body, 15), Err(TooLarge { limit: 15 }));

    // A null already there costs only the value written in its place.
    let status = steps(r#"[{"defaults": {"status": "ok"}}]"#);
    let mut body = json!({"status": null});
    apply(&status, &mut body, 4).unwrap();
    assert_eq!(body, json!({"status": "ok"}));
    let mut body = json!({"status": null});
    assert!(apply(&status, &mut body, 3).is_err());

    // A field already set costs nothing.
    let mut body = json!({"status": "up", "meta": {"v": 2}});
    apply(&nested, &mut body, 0).unwrap();
    apply(&status, &mut body, 0).unwrap();
    assert_eq!(body, json!({"status": "up", "meta": {"v": 2}}));
}

#[test]
fn the_rename_budget_counts_the_objects_it_creates() {
    // Per element: `battery` is new (7 + 4 + 2), `soc` replaces `soc`.
    let nest = steps(r#"[{"rename": {"from": "items[].soc", "to": "items[].battery.soc"}}]"#);
    let body = json!({"items": [{"soc": 1}, {"soc": 2}]});

    let mut fits = body.clone();
    apply(&nest, &mut fits, 26).unwrap();
    assert_eq!(
        fits,
        json!({"items": [{"battery": {"soc": 1}}, {"battery": {"soc": 2}}]})
    );
    let mut over = body;
    assert_eq!(apply(&nest, &mut over, 25), Err(TooLarge { limit: 25 }));

    // Elements without the field move nothing and cost nothing.
    let mut absent = json!({"items": [{"other": 1}, {}]});
    apply(&nest, &mut absent, 0).unwrap();
    assert_eq!(absent, json!({"items": [{"other": 1}, {}]}));

    // A long destination over many small elements passes the budget.
    let items: Vec<Value> = (0..10_000).map(|_| json!({"a": 0})).collect();
    let mut many = object(vec![("items", Value::Array(items))]);
    let long = format!(
        r#"[{{"rename": {{"from": "items[].a", "to": "items[].{}.a"}}}}]"#,
        "k".repeat(1000)
    );
    assert!(apply(&steps(&long), &mut many, 64 * 1024).is_err());

    // Moving a value into a field that exists, or to a shorter key,
    // adds nothing.
    let shorter = steps(r#"[{"rename": {"from": "long_name", "to": "n"}}]"#);
    let mut body = json!({"long_name": 1});
    apply(&shorter, &mut body, 0).unwrap();
    assert_eq!(body, json!({"n": 1}));
}

#[test]
fn convert_scales_numbers() {
    let body = json!({"energy_wh": 75000, "label": "x", "items": [{"wh": 1234}, {"wh": "n/a"}]});
    assert_eq!(
        run(
            r#"[{"convert": {"path": "energy_wh", "factor": 0.001}}]"#,
            body.clone()
        ),
        json!({"energy_wh": 75, "label": "x", "items": [{"wh": 1234}, {"wh": "n/a"}]})
    );
    let out = run(
        r#"[{"convert": {"path": "items[].wh", "factor": 0.001, "round": 1}}]"#,
        body,
    );
    assert_eq!(out["items"], json!([{"wh": 1.2}, {"wh": "n/a"}]));

    // Celsius to Fahrenheit, and half away from zero.
    let f = r#"[{"convert": {"path": "t", "factor": 1.8, "offset": 32, "round": 1}}]"#;
    assert_eq!(run(f, json!({"t": 21.5})), json!({"t": 70.7}));
    let r = r#"[{"convert": {"path": "[]", "round": 0}}]"#;
    assert_eq!(
        run(r, json!([2.5, -2.5, 0.4, "s", null])),
        json!([3, -3, 0, "s", null])
    );
    let r = r#"[{"convert": {"path": "[]", "round": 2}}]"#;
    assert_eq!(run(r, json!([0.125, -0.125, 1.0])), json!([0.13, -0.13, 1]));

    // Results JSON cannot hold leave the value as it was.
    let huge = r#"[{"convert": {"path": "a", "factor": 1e300}}]"#;
    assert_eq!(run(huge, json!({"a": 1e300})), json!({"a": 1e300}));
    let big = u64::MAX;
    assert_eq!(
        run(r#"[{"convert": {"path": "a"}}]"#, json!({"a": big})),
        json!({"a": big})
    );
}

#[test]
fn timestamp_between_notations() {
    let millis = r#"[{"timestamp": {"path": "at", "from": "epoch_millis", "to": "rfc3339"}}]"#;
    assert_eq!(
        run(millis, json!({"at": 1714564800000_i64})),
        json!({"at": "2024-05-01T12:00:00Z"})
    );
    assert_eq!(
        run(millis, json!({"at": 1714564800123_i64})),
        json!({"at": "2024-05-01T12:00:00.123Z"})
    );
    assert_eq!(run(millis, json!({"at": "soon"})), json!({"at": "soon"}));

    let to_secs =
        r#"[{"timestamp": {"path": "items[].at", "from": "rfc3339", "to": "epoch_seconds"}}]"#;
    assert_eq!(
        run(
            to_secs,
            json!({"items": [
                {"at": "2024-05-01T14:00:00+02:00"},
                {"at": "2024-05-01T12:00:00.5Z"},
                {"at": "yesterday"},
                {"at": 5},
            ]})
        ),
        json!({"items": [{"at": 1714564800}, {"at": 1714564800.5}, {"at": "yesterday"}, {"at": 5}]})
    );

    let normalize = r#"[{"timestamp": {"path": "at", "from": "rfc3339", "to": "rfc3339"}}]"#;
    assert_eq!(
        run(normalize, json!({"at": "2024-05-01T14:00:00+02:00"})),
        json!({"at": "2024-05-01T12:00:00Z"})
    );

    let secs = r#"[{"timestamp": {"path": "at", "from": "epoch_seconds", "to": "epoch_millis"}}]"#;
    assert_eq!(
        run(secs, json!({"at": 1714564800.25})),
        json!({"at": 1714564800250_i64})
    );
    assert_eq!(run(secs, json!({"at": 1e300})), json!({"at": 1e300}));
    assert_eq!(run(secs, json!({"at": i64::MAX})), json!({"at": i64::MAX}));
}

// === bytes and hostile input ===

#[test]
fn apply_to_bytes_round_trips() {
    let steps = steps(r#"[{"keep": ["id"]}, {"wrap": "data"}]"#);
    let out = apply_to_bytes(&steps, br#"{ "id": 7, "secret": "s" }"#, u64::MAX).unwrap();
    assert_eq!(out, br#"{"data":{"id":7}}"#);

    for bad in [&b""[..], b"{", b"{\"a\":1} x", b"\xff"] {
        let err = apply_to_bytes(&steps, bad, u64::MAX).unwrap_err();
        assert!(matches!(err, BodyError::InvalidJson(_)));
        assert_eq!(err.to_string(), "response body is not valid json");
    }
}

#[test]
fn deep_text_is_refused_by_the_parser() {
    let depth = 10_000;
    let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let steps = steps(r#"[{"drop_nulls": {}}]"#);
    assert!(apply_to_bytes(&steps, text.as_bytes(), u64::MAX).is_err());

    let text = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
    assert!(apply_to_bytes(&steps, text.as_bytes(), u64::MAX).is_err());
}

/// 10k levels built in code, past the parser's limit: no step may overflow
/// the stack, including the ones that remove the deep part.
#[test]
fn deep_values_do_not_overflow() {
    let each = steps(
        r#"[
            {"case": {"to": "camel"}},
            {"case": {"to": "snake", "path": "deep_obj"}},
            {"flatten": {}},
            {"drop_nulls": {}},
            {"defaults": {"x": 1, "deep_obj.deep_obj.y": 2}},
            {"convert": {"path": "x", "factor": 2}},
            {"rename": {"from": "deep_obj", "to": "moved.here"}},
            {"keep": ["x", "deep_obj.deep_obj"]},
            {"keep": ["x"]},
            {"drop": ["deep_arr", "deep_obj"]},
            {"drop": ["deep_arr[]"]},
            {"wrap": "w"},
            {"extract": "deep_obj.deep_obj"},
            {"extract": "deep_arr[]"}
        ]"#,
    );

    for step in &each {
        let mut deep_arr = json!(null);
        let mut deep_obj = json!(null);
        for _ in 0..10_000 {
            deep_arr = Value::Array(vec![deep_arr, Value::Null]);
            deep_obj = object(vec![("deep_obj", deep_obj), ("some_null", Value::Null)]);
        }
        let x = Value::from(1);
        let mut body = object(vec![
            ("deep_arr", deep_arr),
            ("deep_obj", deep_obj),
            ("x", x),
        ]);

        apply(std::slice::from_ref(step), &mut body, u64::MAX).unwrap();
        ops::discard(body);
    }
}

#[test]
fn deep_values_left_alone_below_the_limit() {
    let mut deep = json!({"leaf_key": null});
    for _ in 0..(MAX_DEPTH + 10) {
        deep = object(vec![("a_b", deep)]);
    }
    let mut body = deep;
    apply(
        &steps(r#"[{"case": {"to": "camel"}}, {"drop_nulls": {}}]"#),
        &mut body,
        u64::MAX,
    )
    .unwrap();

    // The top levels changed; the part past the limit kept its keys and nulls.
    let mut node = &body;
    for _ in 0..=MAX_DEPTH {
        node = &node["aB"];
    }
    assert!(node.get("a_b").is_some(), "past the limit keys stay");
    ops::discard(body);
}
