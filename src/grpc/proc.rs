//! Envoy's `envoy.service.ext_proc.v3.ExternalProcessor` (ext_proc).
//!
//! Envoy opens one stream per HTTP request. Gatehouse is configured to see
//! only the response: its headers always, its body only when the reply to the
//! headers keeps the buffered body phase on (see [`crate::shaping::plan`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{
    BodySendMode, HeaderSendMode,
};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders,
    ImmediateResponse, ProcessingRequest, ProcessingResponse, body_mutation, processing_request,
    processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::METADATA_NAMESPACE;
use super::authz::metadata_from_struct;
use crate::composite;
use crate::config::Composite;
use crate::decision::Metadata;
use crate::metrics::Counter;
use crate::shaping::{self, Plan, ResponseHead};
use crate::state::{Runtime, State};

/// Time on top of a composite's slowest part for merging and answering.
const COMPOSITE_MARGIN: Duration = Duration::from_millis(250);

/// Serves Envoy's ext_proc filter.
pub struct ProcessorService {
    state: Arc<State>,
}

impl ProcessorService {
    /// A processor reading the state's current version per stream.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ProcessorService {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let runtime = self.state.load();
        let (tx, rx) = mpsc::channel(4);

        tokio::spawn(
            async move {
                let mut exchange = Exchange {
                    runtime,
                    metadata: Metadata::default(),
                    plan: None,
                };

                while let Some(message) = inbound.next().await {
                    // Envoy resets the stream once the HTTP exchange is over;
                    // that ends the loop and is not an error worth logging.
                    let Ok(message) = message else { break };
                    exchange.read_metadata(&message);

                    // A composite takes longer than Envoy's usual message
                    // timeout: raise it before starting on the parts.
                    if let Some(raise) = exchange.raise_timeout(&message)
                        && tx.send(Ok(raise)).await.is_err()
                    {
                        break;
                    }
                    let reply = exchange.handle(message).await;
                    if tx.send(Ok(reply)).await.is_err() {
                        break;
                    }
                }
            }
            .instrument(tracing::debug_span!("process")),
        );

        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The state of one HTTP exchange as ext_proc sees it.
struct Exchange {
    runtime: Arc<Runtime>,
    metadata: Metadata,
    plan: Option<Plan>,
}

impl Exchange {
    /// Takes Check's decision from the message's metadata, when present.
    fn read_metadata(&mut self, message: &ProcessingRequest) {
        if let Some(context) = &message.metadata_context
            && let Some(decided) = context.filter_metadata.get(METADATA_NAMESPACE)
        {
            self.metadata = metadata_from_struct(decided);
        }
    }

    /// The composite this request is answered by, if any.
    fn composite_route(&self) -> Option<Arc<Composite>> {
        let route = self.runtime.config.route(self.metadata.route.as_deref()?)?;
        route.composite.clone()
    }

    /// For a composite's request headers, a message that raises Envoy's
    /// message timeout to the composite's budget; its max_message_timeout
    /// bounds the raise.
    fn raise_timeout(&self, message: &ProcessingRequest) -> Option<ProcessingResponse> {
        if !matches!(
            message.request,
            Some(processing_request::Request::RequestHeaders(_))
        ) {
            return None;
        }
        let budget = self.composite_route()?.budget + COMPOSITE_MARGIN;

        Some(ProcessingResponse {
            override_message_timeout: Some(ProtoDuration {
                seconds: i64::try_from(budget.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(budget.subsec_nanos()).unwrap_or_default(),
            }),
            ..ProcessingResponse::default()
        })
    }

    async fn handle(&mut self, message: ProcessingRequest) -> ProcessingResponse {
        match message.request {
            Some(processing_request::Request::RequestHeaders(headers)) => {
                match self.composite(&headers).await {
                    Some(reply) => reply,
                    None => reply(processing_response::Response::RequestHeaders(
                        HeadersResponse::default(),
                    )),
                }
            }
            Some(processing_request::Request::ResponseBody(body)) => {
                self.response_body(body.body, body.end_of_stream).await
            }
            request => self.handle_one(request),
        }
    }

    /// Answers a composite route from its parts, or `None` when the route is
    /// not a composite and the request goes upstream as usual.
    async fn composite(&self, headers: &HttpHeaders) -> Option<ProcessingResponse> {
        let composite = self.composite_route()?;

        let request_headers: Vec<(String, String)> = headers
            .headers
            .as_ref()
            .map(|map| map.headers.iter().map(header_pair).collect())
            .unwrap_or_default();
        let forward = composite::forwarded(request_headers, &self.runtime.config.tokens.forward);

        let steps = composite::Shaping {
            parts: shaping::part_steps(&self.runtime, &self.metadata, &composite),
            whole: shaping::steps_for(&self.runtime, &self.metadata),
        };
        let max_body_bytes = self.runtime.config.reshape.max_body_bytes;
        let answer = composite::answer(&composite, &forward, steps, max_body_bytes).await;
        tracing::debug!(
            request.id = %self.metadata.request_id,
            http.status = answer.status,
            "composite answered",
        );

        let mut set_headers = vec![set_header("content-type", "application/json")];
        for (name, value) in &answer.headers {
            set_headers.push(set_header(name, value));
        }
        if let Some(vary) = &self.metadata.vary {
            set_headers.push(append_header("vary", vary));
        }
        let immediate = ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(answer.status),
            }),
            headers: Some(HeaderMutation {
                set_headers,
                remove_headers: Vec::new(),
            }),
            body: answer.body,
            grpc_status: None,
            details: "gatehouse_composite".to_owned(),
        };

        Some(reply(processing_response::Response::ImmediateResponse(
            immediate,
        )))
    }

    /// The messages that need nothing but the headers or an empty answer.
    fn handle_one(&mut self, request: Option<processing_request::Request>) -> ProcessingResponse {
        match request {
            Some(processing_request::Request::ResponseHeaders(headers)) => {
                self.response_headers(&headers)
            }
            Some(processing_request::Request::ResponseBody(_)) => body_reply(None),
            Some(processing_request::Request::RequestHeaders(_)) => reply(
                processing_response::Response::RequestHeaders(HeadersResponse::default()),
            ),
            Some(processing_request::Request::RequestBody(_)) => reply(
                processing_response::Response::RequestBody(BodyResponse::default()),
            ),
            Some(processing_request::Request::RequestTrailers(_)) => reply(
                processing_response::Response::RequestTrailers(Default::default()),
            ),
            Some(processing_request::Request::ResponseTrailers(_)) => reply(
                processing_response::Response::ResponseTrailers(Default::default()),
            ),
            None => reply(processing_response::Response::ResponseHeaders(
                HeadersResponse::default(),
            )),
        }
    }

    fn response_headers(&mut self, headers: &HttpHeaders) -> ProcessingResponse {
        let map: Vec<(String, String)> = headers
            .headers
            .as_ref()
            .map(|map| map.headers.iter().map(header_pair).collect())
            .unwrap_or_default();
        let find = |name: &str| {
            map.iter()
                .find(|(key, _)| key == name)
                .map(|(_, v)| v.as_str())
        };

        let head = ResponseHead {
            status: find(":status").and_then(|status| status.parse().ok()),
            content_type: find("content-type"),
            content_length: find("content-length").and_then(|len| len.trim().parse().ok()),
            content_encoding: find("content-encoding"),
            end_of_stream: headers.end_of_stream,
        };

        let mut mutation = HeaderMutation::default();
        // A cache must not serve one profile's shape to a client that asked
        // for another with the profile header.
        if let Some(vary) = &self.metadata.vary {
            mutation.set_headers.push(append_header("vary", vary));
        }

        let mut response = reply(processing_response::Response::ResponseHeaders(
            HeadersResponse::default(),
        ));
        match shaping::plan(&self.runtime, &self.metadata, &head) {
            Ok(plan) => {
                tracing::debug!(request.id = %self.metadata.request_id, reshape.profile = ?self.metadata.profile, "buffering the response body to reshape it");
                Counter::ReshapeBuffered.inc();
                response.mode_override = Some(buffer_body(plan.unknown_length));
                self.plan = Some(plan);

                // The upstream's ETag names the body it sent, not the one the
                // client gets. The content-length stays: in BUFFERED mode the
                // body reply sets the new one (see `buffer_body`).
                mutation.remove_headers.push("etag".to_owned());
            }
            Err(reason) => {
                tracing::trace!(request.id = %self.metadata.request_id, reshape.skip = ?reason, "response passes through");
            }
        }

        if !mutation.set_headers.is_empty() || !mutation.remove_headers.is_empty() {
            let common = CommonResponse {
                header_mutation: Some(mutation),
                ..CommonResponse::default()
            };
            response.response = Some(processing_response::Response::ResponseHeaders(
                HeadersResponse {
                    response: Some(common),
                },
            ));
        }
        response
    }

    async fn response_body(&mut self, body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
        let Some(plan) = self.plan.take() else {
            return body_reply(None);
        };
        let unknown_length = plan.unknown_length;
        let old_length = body.len();

        // A partial body means the response outgrew Envoy's buffer: the rest
        // streams on untouched, so this part must too.
        let new_body = if end_of_stream {
            let request_id = self.metadata.request_id.clone();
            shaping::reshape_body_blocking(plan, body, request_id).await
        } else {
            Counter::PassedTooLarge.inc();
            tracing::info!(
                request.id = %self.metadata.request_id,
                "response body outgrew the buffer; passing it unchanged",
            );
            return body_reply(None);
        };

        // Envoy holds the response headers until this reply and refuses a
        // replaced body whose content-length disagrees, so a body of known
        // length gets its new length here. One of unknown length goes on
        // chunked: Envoy dropped its length when it buffered it partially.
        let mut common = CommonResponse::default();
        if !unknown_length {
            let length = new_body.as_ref().map_or(old_length, Vec::len).to_string();
            common.header_mutation = Some(HeaderMutation {
                set_headers: vec![set_header("content-length", &length)],
                remove_headers: Vec::new(),
            });
        }
        if let Some(new_body) = new_body {
            common.body_mutation = Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::Body(new_body)),
            });
        }
        body_reply(Some(common))
    }
}

fn body_reply(common: Option<CommonResponse>) -> ProcessingResponse {
    reply(processing_response::Response::ResponseBody(BodyResponse {
        response: common,
    }))
}

fn reply(response: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..ProcessingResponse::default()
    }
}

/// Turns on the buffered body phase for this response only.
///
/// Envoy's configuration sends no bodies by default, so every response that
/// Gatehouse leaves alone streams through without being held. A response of
/// unknown length (chunked) is buffered partially: Envoy hands over at most
/// its buffer limit, and a body that outgrows it streams on unchanged
/// instead of failing.
///
/// The response headers stay marked as sent: Envoy keeps a buffered body's
/// `content-length` only in BUFFERED mode with headers sent, and leaves it
/// to the processor to set the new one; otherwise it drops the length and
/// the client gets a chunked answer.
fn buffer_body(unknown_length: bool) -> ProcessingMode {
    let mode = if unknown_length {
        BodySendMode::BufferedPartial
    } else {
        BodySendMode::Buffered
    };

    ProcessingMode {
        request_header_mode: HeaderSendMode::Skip.into(),
        response_header_mode: HeaderSendMode::Send.into(),
        request_body_mode: BodySendMode::None.into(),
        response_body_mode: mode.into(),
        request_trailer_mode: HeaderSendMode::Skip.into(),
        response_trailer_mode: HeaderSendMode::Skip.into(),
    }
}

/// Envoy sends header values either as `value` or as `raw_value` bytes.
fn header_pair(header: &HeaderValue) -> (String, String) {
    let value = if header.value.is_empty() {
        String::from_utf8_lossy(&header.raw_value).into_owned()
    } else {
        header.value.clone()
    };
    (header.key.to_ascii_lowercase(), value)
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    header_option(key, value, HeaderAppendAction::OverwriteIfExistsOrAdd)
}

fn append_header(key: &str, value: &str) -> HeaderValueOption {
    header_option(key, value, HeaderAppendAction::AppendIfExistsOrAdd)
}

#[allow(deprecated)]
fn header_option(key: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        }),
        append: None,
        append_action: action.into(),
        keep_empty_value: false,
    }
}
