//! The Redis key layout, in one place.
//!
//! Every key of one decision shares a hash tag, so a Redis Cluster keeps
//! them in one slot and one script can read and write them all atomically.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

use crate::config::{Limit, LimitAlgorithm};

/// Client identifiers longer than this many characters are hashed in keys.
const MAX_CLIENT_CHARS: usize = 256;

/// How much of a hashed identifier is kept before its hash, for people
/// reading keys: with `#` and 64 hex digits the result is 257 characters,
/// longer than any identifier kept as it is, so the two never meet.
const HASHED_PREFIX_CHARS: usize = 192;

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
    let subject = subject_part(prefix, subject, algorithm);
    format!("{subject}:{}", limit.window.as_millis())
}

/// What the keys of one decision share:
/// `<prefix>:rl:{<policy>|<client>}:<group>:<tier>:<algorithm>`; a
/// counter's key is this, `:` and its window in milliseconds.
pub fn subject_part(prefix: &str, subject: &Subject<'_>, algorithm: LimitAlgorithm) -> String {
    let client = client_part(subject.client);
    let algorithm = match algorithm {
        LimitAlgorithm::Gcra => "gcra",
        LimitAlgorithm::FixedWindow => "fw",
    };

    format!(
        "{prefix}:rl:{{{}|{client}}}:{}:{}:{algorithm}",
        subject.policy,
        subject.group.unwrap_or("_"),
        subject.tier.unwrap_or("_"),
    )
}

/// `client` as it is, or when longer than [`MAX_CLIENT_CHARS`], its start
/// and the SHA-256 of all of it: two long identifiers with a common start
/// still count apart.
fn client_part(client: &str) -> Cow<'_, str> {
    if client.chars().count() <= MAX_CLIENT_CHARS {
        return Cow::Borrowed(client);
    }

    let start: String = client.chars().take(HASHED_PREFIX_CHARS).collect();
    let digest = Sha256::digest(client.as_bytes());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    Cow::Owned(format!("{start}#{hex}"))
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

    #[test]
    fn long_client_ids_with_a_common_start_count_apart() {
        let common = "x".repeat(300);
        let (a, b) = (format!("client:{common}a"), format!("client:{common}b"));
        let key = |client: &str| {
            let subject = Subject {
                policy: "p",
                client,
                group: None,
                tier: None,
            };
            let limit = Limit {
                requests: 1,
                window: Duration::from_secs(1),
                burst: 1,
            };
            counter("gh", &subject, LimitAlgorithm::Gcra, &limit)
        };

        assert_ne!(key(&a), key(&b));
        assert_eq!(key(&a), key(&a), "the same id keeps its key");
        assert!(key(&a).starts_with("gh:rl:{p|client:xxx"), "{}", key(&a));

        // An id of exactly the limit stays as it is; one past it is hashed
        // into something longer than any id kept as it is.
        let at_limit = "y".repeat(MAX_CLIENT_CHARS);
        assert_eq!(client_part(&at_limit), at_limit.as_str());
        let hashed = client_part(&a);
        assert_eq!(hashed.chars().count(), MAX_CLIENT_CHARS + 1);
        assert!(hashed.contains('#'), "{hashed}");

        // Sent as an id of its own, the hashed form is too long to be kept
        // and is hashed again: it cannot land on the long id's counter.
        assert_ne!(key(&hashed), key(&a));
    }
}
