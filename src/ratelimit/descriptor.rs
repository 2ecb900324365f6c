//! Descriptors of Envoy's rate-limit API, matched against the configured
//! ones.
//!
//! A configured descriptor matches a request's descriptor when the domain is
//! the same and the entries have the same keys in the same order, with the
//! configured value wherever one is given. The request's values then name
//! the counter, so each distinct value (an address, a path) counts apart.

use crate::config::Descriptor;

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

    let values: Vec<String> = entries.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Some((descriptor, format!("rls:{domain}:{}", values.join(","))))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::{FailureMode, Limit, LimitAlgorithm, RateLimitPolicy};

    fn descriptor(entries: &[(&str, Option<&str>)]) -> Descriptor {
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
            domain: "edge".to_owned(),
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
}
