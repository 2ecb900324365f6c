//! Descriptors of Envoy's rate-limit API, matched against the configured
//! ones.
//!
//! A configured descriptor matches a request's descriptor when the domain is
//! the same and the entries have the same keys in the same order, with the
//! configured value wherever one is given. The request's values then name
//! the counter, so each distinct value (an address, a path) counts apart.

use std::fmt::Write;

use crate::config::Descriptor;

/// Characters that separate the parts of a descriptor's client key, and `%`
/// itself; each is written as `%XX` inside a domain, key or value.
const SEPARATORS: &[char] = &['%', ',', '=', ':', '{', '}', '|'];

/// The first configured descriptor matching `entries` in `domain`, and the
/// client key its counters use.
pub fn find<'a>(
    descriptors: &'a [Descriptor],
    domain: &str,
    entries: &[(String, String)],
) -> Option<(&'a Descriptor, String)> {
    let descriptor = descriptors.iter().find(|descriptor| {
        descriptor.domain == domain
            && descriptor.entries.len() == entries.len()
            && descriptor
                .entries
                .iter()
                .zip(entries)
                .all(|((key, value), (k, v))| {
                    key == k && value.as_ref().is_none_or(|value| value == v)
                })
    })?;

    // Escaped, so that `,` `=` and `:` inside a value cannot make two value
    // sets spell one key.
    let values: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
        .collect();
    let key = format!("rls:{}:{}", escape(domain), values.join(","));
    Some((descriptor, key))
}

/// `text` with every separator written as `%` and its two hex digits.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if SEPARATORS.contains(&c) {
            // Writing to a String cannot fail.
            let _ = write!(escaped, "%{:02X}", u32::from(c));
        } else {
            escaped.push(c);
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::{FailureMode, Limit, LimitAlgorithm, RateLimitPolicy};

    fn descriptor(entries: &[(&str, Option<&str>)]) -> Descriptor {
        descriptor_in("edge", entries)
    }

    fn descriptor_in(domain: &str, entries: &[(&str, Option<&str>)]) -> Descriptor {
        let policy = RateLimitPolicy {
            tier_claim: None,
            name: "edge".to_owned(),
            algorithm: LimitAlgorithm::Gcra,
            limits: vec![Limit {
                requests: 1,
                window: Duration::from_secs(1),
                burst: 1,
            }],
            tiers: HashMap::new(),
            failure_mode: FailureMode::Closed,
            shadow: false,
            x_ratelimit_headers: false,
        };
        Descriptor {
            domain: domain.to_owned(),
            entries: entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned)))
                .collect(),
            policy: Arc::new(policy),
        }
    }

    fn entries(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn keys_must_match_in_order_and_fixed_values_exactly() {
        let configured = [descriptor(&[
            ("path", Some("/a")),
            ("remote_address", None),
        ])];

        let hit = find(
            &configured,
            "edge",
            &entries(&[("path", "/a"), ("remote_address", "1.2.3.4")]),
        );
        assert_eq!(
            hit.map(|(_, key)| key).as_deref(),
            Some("rls:edge:path=/a,remote_address=1.2.3.4")
        );

        assert!(
            find(
                &configured,
                "edge",
                &entries(&[("path", "/b"), ("remote_address", "x")])
            )
            .is_none()
        );
        assert!(
            find(
                &configured,
                "other",
                &entries(&[("path", "/a"), ("remote_address", "x")])
            )
            .is_none()
        );
        assert!(
            find(
                &configured,
                "edge",
                &entries(&[("remote_address", "x"), ("path", "/a")])
            )
            .is_none()
        );
        assert!(find(&configured, "edge", &entries(&[("path", "/a")])).is_none());
    }

    #[test]
    fn separators_inside_values_cannot_make_two_value_sets_share_a_counter() {
        // Both descriptors count with one policy, so only the key tells
        // their counters apart.
        let configured = [
            descriptor(&[("a", None)]),
            descriptor(&[("a", None), ("b", None)]),
            descriptor_in("edge:a=1", &[("b", None)]),
        ];
        let key = |domain: &str, pairs: &[(&str, &str)]| {
            find(&configured, domain, &entries(pairs)).map(|(_, key)| key)
        };

        let one = key("edge", &[("a", "1,b=2")]).expect("first descriptor");
        let two = key("edge", &[("a", "1"), ("b", "2")]).expect("second descriptor");
        assert_ne!(one, two);
        assert_eq!(one, "rls:edge:a=1%2Cb%3D2");
        assert_eq!(two, "rls:edge:a=1,b=2");

        // A separator in the domain cannot pass for one either.
        let three = key("edge:a=1", &[("b", "2")]).expect("third descriptor");
        assert_eq!(three, "rls:edge%3Aa%3D1:b=2");
        assert_ne!(three, key("edge", &[("a", "1:b=2")]).expect("first"));

        // `%` itself is escaped, so an escape cannot be forged.
        let percent = key("edge", &[("a", "1%2Cb%3D2")]).expect("first descriptor");
        assert_ne!(percent, one);
    }
}
