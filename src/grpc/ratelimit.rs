//! Envoy's `envoy.service.ratelimit.v3.RateLimitService`, so that Envoy's own
//! global rate-limit filter can count with Gatehouse's policies.
//!
//! Each descriptor in a request is matched against the configured ones (see
//! [`crate::ratelimit::descriptor`]) and decided on its own, all at once;
//! one over its limit makes the whole answer `OVER_LIMIT`, and Envoy answers
//! 429. Deliberately, as in Envoy's reference service, the descriptors of one
//! request are not all or nothing: one admitted stays counted when another
//! refuses. Limits that must hold together belong in one policy.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use futures::future::join_all;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::config::RateLimitPolicy;
use crate::decision;
use crate::ratelimit::{Outcome, Query, Verdict, descriptor};
use crate::state::State;

/// Serves `ShouldRateLimit` for Envoy's rate-limit filters.
pub struct RateLimitServer {
    state: Arc<State>,
}

impl RateLimitServer {
    /// A service deciding with the state's current version.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimitServer {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::info_span!(
            "should_rate_limit",
            ratelimit.domain = %request.domain,
            ratelimit.descriptors = request.descriptors.len(),
        );
        let runtime = self.state.load();

        async move {
            let default_cost = u64::from(request.hits_addend.max(1));
            let configured = &runtime.config.descriptors;
            let plans: Vec<Plan<'_>> = request
                .descriptors
                .iter()
                .map(|sent| plan(configured, &request.domain, default_cost, sent))
                .collect();

            // Every descriptor at once, so the call takes one Redis budget
            // however many there are.
            let limiter = &runtime.limiter;
            let outcomes = join_all(plans.iter().map(|plan| async move {
                match plan {
                    Plan::Decide {
                        policy,
                        client,
                        cost,
                    } => {
                        let query = Query::new(policy, client, None, None, *cost);
                        Some(limiter.decide(&query).await)
                    }
                    Plan::Unmatched | Plan::Unaffordable { .. } => None,
                }
            }))
            .await;

            let mut overall = Code::Ok;
            let mut statuses = Vec::with_capacity(plans.len());
            let mut headers = Vec::new();
            let mut retry_after = None;
            for (plan, outcome) in plans.iter().zip(outcomes) {
                let (policy, outcome) = match (plan, outcome) {
                    (Plan::Decide { policy, .. }, Some(outcome)) => (*policy, outcome),
                    (Plan::Unaffordable { policy, cost, most }, _) => {
                        // Refused without counting, and no wait would help.
                        tracing::info!(
                            ratelimit.policy = %policy.name,
                            ratelimit.cost = cost,
                            ratelimit.max_cost = most,
                            "descriptor costs more than its policy ever admits at once"
                        );
                        overall = Code::OverLimit;
                        statuses.push(status(Code::OverLimit, None));
                        continue;
                    }
                    _ => {
                        // Nothing configured for it: not limited here.
                        statuses.push(status(Code::Ok, None));
                        continue;
                    }
                };

                // A policy that fails closed answers with a gRPC error: Envoy's
                // `failure_mode_deny` and `status_on_error` then decide the
                // client's answer, as for ext_authz. One that fails open lets
                // the descriptor through uncounted.
                match outcome {
                    Outcome::Allowed(verdict) => {
                        // A refused descriptor's headers explain the 429, so
                        // an allowed one never replaces them.
                        if overall == Code::Ok {
                            headers = verdict.headers(policy);
                        }
                        statuses.push(status(Code::Ok, Some((policy, &verdict))));
                    }
                    Outcome::Refused(verdict) => {
                        if retry_after.is_none_or(|longest| verdict.retry_after >= longest) {
                            headers = verdict.headers(policy);
                            retry_after = Some(verdict.retry_after);
                        }
                        overall = Code::OverLimit;
                        statuses.push(status(Code::OverLimit, Some((policy, &verdict))));
                    }
                    Outcome::FailedOpen => statuses.push(status(Code::Ok, None)),
                    Outcome::FailedClosed => {
                        return Err(Status::unavailable("rate limit store unavailable"));
                    }
                }
            }

            if overall == Code::OverLimit {
                if let Some(wait) = retry_after {
                    headers.push(decision::retry_after_header(wait));
                }
                tracing::info!(
                    ratelimit.decision = "over_limit",
                    "descriptor over its limit"
                );
            }
            let response = RateLimitResponse {
                overall_code: overall.into(),
                statuses,
                response_headers_to_add: headers.into_iter().map(header).collect(),
                ..RateLimitResponse::default()
            };
            Ok(Response::new(response))
        }
        .instrument(span)
        .await
    }
}

/// What to do with one descriptor of a request.
#[derive(Debug, PartialEq)]
enum Plan<'a> {
    /// No configured descriptor matches: not limited here.
    Unmatched,
    /// It costs more than its policy ever admits at once: refused, uncounted.
    Unaffordable {
        policy: &'a RateLimitPolicy,
        cost: u64,
        most: u64,
    },
    /// Count it under `policy` for `client`.
    Decide {
        policy: &'a RateLimitPolicy,
        client: String,
        cost: u64,
    },
}

/// Matches `sent` and works out its cost: its own `hits_addend`, else the
/// request's, at least 1.
///
/// The cost comes from Envoy and may be anything up to `u64::MAX`. One above
/// the smallest burst of the policy's limits can never be admitted, and the
/// scripts' arithmetic is only exact for costs a policy can admit, so such a
/// descriptor is refused before it reaches the store.
fn plan<'a>(
    configured: &'a [crate::config::Descriptor],
    domain: &str,
    default_cost: u64,
    sent: &RateLimitDescriptor,
) -> Plan<'a> {
    let entries: Vec<(String, String)> = sent
        .entries
        .iter()
        .map(|entry| (entry.key.clone(), entry.value.clone()))
        .collect();
    let Some((descriptor, client)) = descriptor::find(configured, domain, &entries) else {
        return Plan::Unmatched;
    };
    let policy = descriptor.policy.as_ref();

    // TODO: negative hits (`is_negative_hits`) are counted as positive
    // ones; returning quota is not supported yet.
    let cost = sent
        .hits_addend
        .map_or(default_cost, |value| value.value.max(1));
    let most = policy.limits.iter().map(|limit| limit.burst).min();
    match most {
        Some(most) if cost > most => Plan::Unaffordable { policy, cost, most },
        _ => Plan::Decide {
            policy,
            client,
            cost,
        },
    }
}

/// A descriptor's status; the limit reported is its tightest.
fn status(code: Code, decided: Option<(&RateLimitPolicy, &Verdict)>) -> DescriptorStatus {
    let mut status = DescriptorStatus {
        code: code.into(),
        ..DescriptorStatus::default()
    };
    let Some((policy, verdict)) = decided else {
        return status;
    };
    let Some(tightest) = verdict.limits.iter().min_by_key(|limit| limit.remaining) else {
        return status;
    };

    let (unit, per_unit) = unit(tightest.limit.window, tightest.limit.requests);
    status.current_limit = Some(RateLimit {
        name: policy.name.clone(),
        requests_per_unit: per_unit,
        unit: unit.into(),
    });
    status.limit_remaining = u32::try_from(tightest.remaining).unwrap_or(u32::MAX);
    status.duration_until_reset = Some(envoy_types::pb::google::protobuf::Duration {
        seconds: i64::try_from(tightest.reset.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(tightest.reset.subsec_nanos()).unwrap_or(0),
    });
    status
}

/// Envoy's units are whole seconds, minutes, hours and days; other windows
/// are reported as `UNKNOWN` with the window's own count.
fn unit(window: Duration, requests: u64) -> (Unit, u32) {
    let unit = match window.as_secs() {
        1 => Unit::Second,
        60 => Unit::Minute,
        3600 => Unit::Hour,
        86_400 => Unit::Day,
        _ => Unit::Unknown,
    };
    (unit, u32::try_from(requests).unwrap_or(u32::MAX))
}

fn header((key, value): (String, String)) -> HeaderValue {
    HeaderValue {
        key,
        value,
        raw_value: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{FailureMode, Limit, LimitAlgorithm};
    use crate::ratelimit::LimitStatus;

    /// A policy of 10 a second and 100 a minute that fails closed.
    fn edge_policy() -> RateLimitPolicy {
        let limit = |requests, secs| Limit {
            requests,
            window: Duration::from_secs(secs),
            burst: requests,
        };
        RateLimitPolicy {
            tier_claim: None,
            name: "edge".to_owned(),
            algorithm: LimitAlgorithm::Gcra,
            limits: vec![limit(10, 1), limit(100, 60)],
            tiers: HashMap::new(),
            failure_mode: FailureMode::Closed,
            shadow: false,
            x_ratelimit_headers: false,
        }
    }

    #[test]
    fn whole_units_map_to_envoys_and_others_are_unknown() {
        assert_eq!(unit(Duration::from_secs(1), 10), (Unit::Second, 10));
        assert_eq!(unit(Duration::from_secs(3600), 100), (Unit::Hour, 100));
        assert_eq!(unit(Duration::from_secs(7), 3), (Unit::Unknown, 3));
    }

    #[test]
    fn a_status_reports_the_tightest_limit() {
        let policy = edge_policy();
        let verdict = Verdict {
            allowed: false,
            retry_after: Duration::from_secs(2),
            limits: vec![
                LimitStatus {
                    limit: policy.limits[0],
                    remaining: 4,
                    reset: Duration::from_millis(600),
                },
                LimitStatus {
                    limit: policy.limits[1],
                    remaining: 0,
                    reset: Duration::from_millis(1500),
                },
            ],
        };

        let status = status(Code::OverLimit, Some((&policy, &verdict)));

        assert_eq!(status.code, i32::from(Code::OverLimit));
        let current = status.current_limit.expect("a limit");
        assert_eq!(
            (current.requests_per_unit, current.unit),
            (100, Unit::Minute.into())
        );
        assert_eq!(status.limit_remaining, 0);
        let reset = status.duration_until_reset.expect("a reset");
        assert_eq!((reset.seconds, reset.nanos), (1, 500_000_000));
    }

    #[test]
    fn a_cost_beyond_every_burst_is_refused_before_the_store() {
        use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;

        let policy = Arc::new(edge_policy());
        let configured = [crate::config::Descriptor {
            domain: "edge".to_owned(),
            entries: vec![("remote_address".to_owned(), None)],
            policy: policy.clone(),
        }];
        let sent = |hits: Option<u64>| RateLimitDescriptor {
            entries: vec![Entry {
                key: "remote_address".to_owned(),
                value: "192.0.2.1".to_owned(),
            }],
            hits_addend: hits.map(|value| envoy_types::pb::google::protobuf::UInt64Value { value }),
            ..RateLimitDescriptor::default()
        };
        let cost_of = |plan: Plan<'_>| match plan {
            Plan::Decide { cost, .. } => Ok(cost),
            Plan::Unaffordable { cost, most, .. } => Err((cost, most)),
            Plan::Unmatched => panic!("the descriptor matches"),
        };

        // Envoy's own numbers: the descriptor's, else the request's, at least 1.
        assert_eq!(cost_of(plan(&configured, "edge", 1, &sent(None))), Ok(1));
        assert_eq!(cost_of(plan(&configured, "edge", 4, &sent(None))), Ok(4));
        assert_eq!(cost_of(plan(&configured, "edge", 4, &sent(Some(0)))), Ok(1));
        assert_eq!(
            cost_of(plan(&configured, "edge", 1, &sent(Some(10)))),
            Ok(10)
        );

        // More than the smallest burst never passes and never reaches Redis.
        assert_eq!(
            cost_of(plan(&configured, "edge", 1, &sent(Some(11)))),
            Err((11, 10))
        );
        assert_eq!(
            cost_of(plan(&configured, "edge", 1, &sent(Some(u64::MAX)))),
            Err((u64::MAX, 10))
        );
        let request_wide = u64::from(u32::MAX);
        assert_eq!(
            cost_of(plan(&configured, "edge", request_wide, &sent(None))),
            Err((request_wide, 10))
        );
        assert_eq!(plan(&configured, "other", 1, &sent(None)), Plan::Unmatched);
    }
}
