//! How long cached verdicts live: a verified JWT until its `exp`, an
//! introspection result until the earlier of its `exp` and the configured
//! TTL, an inactive one briefly.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moka::Expiry;

use super::Identity;

/// Cache keys: the SHA-256 of the token, so no token is stored in clear.
pub type Digest = [u8; 32];

/// The SHA-256 of `token`.
pub fn digest(token: &str) -> Digest {
    use sha2::{Digest as _, Sha256};

    Sha256::digest(token.as_bytes()).into()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Time left until `expires_at` (Unix seconds), zero when past.
pub fn until(expires_at: u64) -> Duration {
    Duration::from_secs(expires_at.saturating_sub(unix_now()))
}

/// A verified JWT, with the rules it passed.
///
/// The cache outlives reloads, so an entry names the version of its
/// provider's rules (audiences, claims, leeway, algorithms, keys) that
/// verified it: once those change, the entry no longer counts.
#[derive(Clone)]
pub struct Verified {
    /// Who the token names.
    pub identity: Arc<Identity>,
    /// The [`Rules`] version that verified it.
    pub rules: Rules,
}

/// One version of a provider's verification rules; every change, and every
/// provider built anew, gets a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rules(u64);

impl Rules {
    /// A version no other has had.
    pub fn next() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};

        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Verified JWTs live until their own `exp`.
pub struct UntilExpiry;

impl Expiry<Digest, Verified> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &Digest,
        verified: &Verified,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(until(verified.identity.expires_at))
    }
}

/// An introspection verdict.
#[derive(Debug)]
pub enum Introspected {
    /// The provider says the token is active.
    Active(Arc<Identity>),
    /// The provider says it is not (revoked, expired, unknown).
    Inactive,
    /// Active, but not for Gatehouse (another audience or issuer).
    Refused(super::AuthnError),
}

/// Introspection verdicts: active ones until the earlier of `exp` and
/// `ttl`, inactive ones for `inactive_ttl`.
pub struct IntrospectionExpiry {
    /// Longest reuse of an active verdict.
    pub ttl: Duration,
    /// Reuse of an inactive verdict.
    pub inactive_ttl: Duration,
}

impl Expiry<Digest, Arc<Introspected>> for IntrospectionExpiry {
    fn expire_after_create(
        &self,
        _key: &Digest,
        verdict: &Arc<Introspected>,
        _created_at: Instant,
    ) -> Option<Duration> {
        match verdict.as_ref() {
            Introspected::Active(identity) => Some(until(identity.expires_at).min(self.ttl)),
            Introspected::Inactive | Introspected::Refused(_) => Some(self.inactive_ttl),
        }
    }
}
