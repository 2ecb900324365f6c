//! Envoy's `envoy.service.auth.v3.Authorization` (ext_authz).

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HttpStatus,
};
use envoy_types::ext_authz::v3::{CheckRequestExt, CheckResponseExt, OkHttpResponseBuilder};
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::check;
use crate::decision::{Allow, Decision, Deny, Metadata};
use crate::state::State;

/// Serves Check for Envoy's ext_authz filter.
pub struct AuthorizationService {
    state: Arc<State>,
}

impl AuthorizationService {
    /// A service deciding with the state's current version.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl Authorization for AuthorizationService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let request = request.into_inner();
        let empty = HashMap::new();
        let headers = request.get_client_headers().unwrap_or(&empty);
        let http = request
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());

        let Some(http) = http else {
            // Without HTTP attributes there is nothing to decide on; this is
            // a misconfigured caller, not a client, so it is a gRPC error.
            return Err(Status::invalid_argument(
                "check request has no http attributes",
            ));
        };

        let request_id = headers
            .get("x-request-id")
            .map(String::as_str)
            .unwrap_or(&http.id);
        let input = check::Request {
            method: &http.method,
            path: &http.path,
            headers,
            client_address: request.get_client_address().map(String::as_str),
            request_id,
        };

        let span = tracing::info_span!(
            "check",
            request.id = %request_id,
            http.method = %http.method,
            route = tracing::field::Empty,
            client.id = tracing::field::Empty,
        );
        let runtime = self.state.load();
        let decision = check::decide(&runtime, input).instrument(span).await;

        Ok(Response::new(to_check_response(decision)))
    }
}

fn to_check_response(decision: Decision) -> CheckResponse {
    match decision {
        Decision::Allow(allow) => allowed(*allow),
        Decision::Deny(deny) => denied(deny),
    }
}

fn allowed(allow: Allow) -> CheckResponse {
    let mut ok = OkHttpResponseBuilder::new();
    for (name, value) in &allow.set_headers {
        ok.add_header(
            name,
            value,
            Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
            false,
        );
    }
    for (name, value) in &allow.add_headers {
        ok.add_header(
            name,
            value,
            Some(HeaderAppendAction::AppendIfExistsOrAdd),
            false,
        );
    }
    for name in &allow.remove_headers {
        ok.remove_header(name);
    }
    for name in &allow.remove_query {
        ok.remove_query_parameter(name);
    }
    for (name, value) in &allow.response_headers {
        ok.add_response_header(
            name,
            value,
            Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
            false,
        );
    }

    let mut response = CheckResponse::with_status(Status::ok("allowed"));
    response
        .set_http_response(ok)
        .set_dynamic_metadata(Some(metadata_struct(&allow.metadata)));
    response
}

fn denied(deny: Deny) -> CheckResponse {
    let status = match deny.status {
        401 => Status::unauthenticated("denied"),
        429 => Status::resource_exhausted("denied"),
        400 => Status::invalid_argument("denied"),
        503 => Status::unavailable("denied"),
        _ => Status::permission_denied("denied"),
    };

    let headers = deny
        .headers
        .into_iter()
        .map(|(key, value)| header_option(key, value))
        .collect();
    let http = DeniedHttpResponse {
        status: Some(HttpStatus {
            code: i32::from(deny.status),
        }),
        headers,
        body: deny.body,
    };

    let mut response = CheckResponse::with_status(status);
    response.set_http_response(http);
    response
}

#[allow(deprecated)]
fn header_option(key: String, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key,
            value,
            raw_value: Vec::new(),
        }),
        append: None,
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
        keep_empty_value: false,
    }
}

/// Check's decision as dynamic metadata; ext_proc reads it back with
/// [`metadata_from_struct`].
pub fn metadata_struct(metadata: &Metadata) -> Struct {
    let mut fields = HashMap::new();
    let mut put = |key: &str, value: &Option<String>| {
        if let Some(value) = value {
            fields.insert(
                key.to_owned(),
                Value {
                    kind: Some(Kind::StringValue(value.clone())),
                },
            );
        }
    };

    put("request_id", &Some(metadata.request_id.clone()));
    put("route", &metadata.route);
    put("client_id", &metadata.client_id);
    put("profile", &metadata.profile);
    put("fields", &metadata.fields);
    put("vary", &metadata.vary);

    Struct { fields }
}

/// Reads back what [`metadata_struct`] wrote; missing fields stay empty.
pub fn metadata_from_struct(value: &Struct) -> Metadata {
    let get = |key: &str| match value.fields.get(key).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(text)) => Some(text.clone()),
        _ => None,
    };

    Metadata {
        request_id: get("request_id").unwrap_or_default(),
        route: get("route"),
        client_id: get("client_id"),
        profile: get("profile"),
        fields: get("fields"),
        vary: get("vary"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips() {
        let metadata = Metadata {
            request_id: "r-1".to_owned(),
            route: Some("vehicles".to_owned()),
            client_id: Some("demo-mobile".to_owned()),
            profile: None,
            fields: Some("id,battery.soc".to_owned()),
            vary: Some("x-client-type".to_owned()),
        };

        assert_eq!(metadata_from_struct(&metadata_struct(&metadata)), metadata);
    }

    #[test]
    fn denial_carries_status_headers_and_body() {
        let deny = Deny {
            status: 429,
            headers: vec![("retry-after".to_owned(), "3".to_owned())],
            body: "{}".to_owned(),
        };
        let response = to_check_response(Decision::Deny(deny));

        assert_eq!(
            response.status.as_ref().map(|s| s.code),
            Some(tonic::Code::ResourceExhausted as i32)
        );
        let Some(envoy_types::ext_authz::v3::pb::HttpResponse::DeniedResponse(http)) =
            response.http_response
        else {
            panic!("expected a denied response");
        };
        assert_eq!(http.status.map(|s| s.code), Some(429));
        assert_eq!(http.body, "{}");
    }
}
