//! The Redis key layout, in one place.
//!
//! Every key of one decision shares a hash tag, so a Redis Cluster keeps
//! them in one slot and one script can read and write them all atomically.

use crate::config::{Limit, LimitAlgorithm};

/// Client identifiers are cut to this many characters in keys.
const MAX_CLIENT_CHARS: usize = 256;

/// Who is counted, under which policy, route group and tier.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The policy's name.
    pub policy: &'a str,
    /// `client:<id>`, `addr:<address>` or a descriptor's values.
    pub client: &'a str,
    /// The route group, when the route names one.
    pub group: Option<&'a str>,
    /// The tier whose limits apply, when the client is on one.
    pub tier: Option<&'a str>,
}

/// The counter key of one limit:
/// `<prefix>:rl:{<policy>|<client>}:<group>:<tier>:<algorithm>:<window ms>`.
///
/// The hash tag is the text between the first `{` and the first `}` after
/// it. Every key of one decision starts with the same prefix, policy and
/// client, so whatever those contain, the tag (and so the slot) is the same
/// for all of them. The algorithm and window are part of the key so that a
/// reload that changes them never reads a counter written under other rules.
pub fn counter(
    prefix: &str,
    subject: &Subject<'_>,
    algorithm: LimitAlgorithm,
    limit: &Limit,
) -> String {
    let client: String = subject.client.chars().take(MAX_CLIENT_CHARS).collect();
    let algorithm = match algorithm {
        LimitAlgorithm::Gcra => "gcra",
        LimitAlgorithm::FixedWindow => "fw",
    };

    format!(
        "{prefix}:rl:{{{}|{client}}}:{}:{}:{algorithm}:{}",
        subject.policy,
        subject.group.unwrap_or("_"),
        subject.tier.unwrap_or("_"),
        limit.window.as_millis(),
    )
}

/// The pattern that matches every key Gatehouse writes under `prefix`.
pub fn all(prefix: &str) -> String {
    format!("{prefix}:rl:*")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn keys_share_one_hash_tag_per_policy_and_client() {
        let subject = Subject {
            policy: "standard",
            client: "client:app-1",
            group: Some("writes"),
            tier: None,
        };
        let limit = |secs| Limit {
            requests: 10,
            window: Duration::from_secs(secs),
            burst: 10,
        };

        let second = counter("gh", &subject, LimitAlgorithm::Gcra, &limit(1));
        let hour = counter("gh", &subject, LimitAlgorithm::Gcra, &limit(3600));

        assert_eq!(second, "gh:rl:{standard|client:app-1}:writes:_:gcra:1000");
        assert_eq!(hour, "gh:rl:{standard|client:app-1}:writes:_:gcra:3600000");
    }
}
