//! The accept loop, routing, authentication, faults and the request record.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;

use crate::body::MockBody;
use crate::knobs::{Knobs, Plan};
use crate::real;
use crate::responses_api;
use crate::wire::{self, Events};
use crate::{MockDefaults, MockError, TlsFiles};

/// How many requests `GET /_mock/requests` keeps.
const RECORD_CAP: usize = 64;
/// Largest request body accepted.
const MAX_BODY: usize = 64 << 20;

/// One request as recorded for `GET /_mock/requests`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedRequest {
    /// `POST`, `GET`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string, if any.
    pub query: Option<String>,
    /// Header names (lower case) and values, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body as UTF-8 text: exactly the bytes received when they are
    /// valid UTF-8 (as JSON must be), never re-serialised; invalid sequences
    /// become U+FFFD.
    pub body: String,
    /// The body exactly as received, byte for byte (not in the JSON record).
    #[serde(skip)]
    pub body_bytes: Bytes,
    /// Real-API mode only: what the mock billed for this request; `None`
    /// (and absent from the JSON record) in the default mode and for requests
    /// answered with an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub billed: Option<Billed>,
}

/// The usage a real-API-mode response billed (see the `real` module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Billed {
    /// Input tokens (OpenAI `prompt_tokens`, Anthropic `input_tokens`), counted once.
    pub input_tokens: u64,
    /// Output tokens over all choices (OpenAI `completion_tokens`, Anthropic `output_tokens`).
    pub output_tokens: u64,
    /// Choices generated (OpenAI `n`; 1 for Anthropic).
    pub choices: u64,
}

/// State shared by every connection.
pub(crate) struct State {
    defaults: MockDefaults,
    /// `Bearer <key>` for the OpenAI paths.
    bearer: Option<String>,
    next_id: AtomicU64,
    pub(crate) recording: AtomicBool,
    /// Sequence number of the next record.
    next_record: AtomicU64,
    /// Records with their sequence numbers, oldest first.
    records: Mutex<VecDeque<(u64, RecordedRequest)>>,
}

impl State {
    pub(crate) fn new(defaults: MockDefaults) -> Self {
        Self {
            bearer: defaults
                .expected_key
                .as_ref()
                .map(|k| format!("Bearer {k}")),
            defaults,
            next_id: AtomicU64::new(1),
            recording: AtomicBool::new(true),
            next_record: AtomicU64::new(0),
            records: Mutex::new(VecDeque::with_capacity(RECORD_CAP)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, RecordedRequest)>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn recorded(&self) -> Vec<RecordedRequest> {
        self.lock().iter().map(|(_, r)| r.clone()).collect()
    }

    pub(crate) fn clear_recorded(&self) {
        self.lock().clear();
    }

    /// Records a request; returns its sequence number for [`State::bill`].
    fn record(&self, parts: &hyper::http::request::Parts, body: &Bytes) -> u64 {
        let rec = RecordedRequest {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: String::from_utf8_lossy(body).into_owned(),
            body_bytes: body.clone(),
            billed: None,
        };
        let mut records = self.lock();
        // Numbered under the lock, so the queue stays in sequence order.
        let seq = self.next_record.fetch_add(1, Ordering::Relaxed);
        if records.len() == RECORD_CAP {
            records.pop_front();
        }
        records.push_back((seq, rec));
        seq
    }

    /// Adds the bill to record `seq`, unless it was cleared or pushed out.
    fn bill(&self, seq: u64, billed: Billed) {
        if let Some((_, rec)) = self.lock().iter_mut().rev().find(|(s, _)| *s == seq) {
            rec.billed = Some(billed);
        }
    }
}

/// Loads the PEM files into a TLS acceptor (ring, HTTP/1.1).
pub(crate) fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, MockError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| MockError::Tls(format!("reading {}: {e}", path.display())))
    };
    let cert_pem = read(&files.cert_pem)?;
    let key_pem = read(&files.key_pem)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MockError::Tls(format!("parsing {}: {e}", files.cert_pem.display())))?;
    if certs.is_empty() {
        return Err(MockError::Tls(format!(
            "no certificate in {}",
            files.cert_pem.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| MockError::Tls(format!("parsing {}: {e}", files.key_pem.display())))?
        .ok_or_else(|| MockError::Tls(format!("no private key in {}", files.key_pem.display())))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MockError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| MockError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections until `stop` fires (or its sender is dropped).
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(_) => return,
    };
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors or similar: back off briefly.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        match &tls {
            None => {
                tokio::spawn(connection(stream, state));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        connection(stream, state).await;
                    }
                });
            }
        }
    }
}

async fn connection<S>(io: S, state: Arc<State>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| handle(Arc::clone(&state), req));
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// Which provider's conventions a path follows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Provider {
    OpenAi,
    Anthropic,
}

fn response(status: StatusCode, content_type: &'static str, body: MockBody) -> Response<MockBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<MockBody> {
    response(status, "application/json", MockBody::full(body))
}

fn error(provider: Provider, status: StatusCode, message: &str) -> Response<MockBody> {
    let code = status.as_u16();
    let body = match provider {
        Provider::OpenAi => wire::openai_error(wire::openai_error_type(code), message, None),
        Provider::Anthropic => wire::anthropic_error(wire::anthropic_error_type(code), message),
    };
    let mut resp = json(status, body);
    if code == 429 {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn authorized(state: &State, provider: Provider, headers: &hyper::HeaderMap) -> bool {
    let Some(key) = &state.defaults.expected_key else {
        return true;
    };
    match provider {
        Provider::OpenAi => {
            let bearer = state.bearer.as_deref().unwrap_or_default();
            headers
                .get(hyper::header::AUTHORIZATION)
                .is_some_and(|v| v.as_bytes() == bearer.as_bytes())
        }
        Provider::Anthropic => headers
            .get("x-api-key")
            .is_some_and(|v| v.as_bytes() == key.as_bytes()),
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if path == "/healthz" {
        return Ok(response(StatusCode::OK, "text/plain", MockBody::full("ok")));
    }
    if path == "/_mock/requests" {
        return Ok(match parts.method {
            Method::GET => {
                // How many were recorded in all (older ones pushed out of the 64 included).
                let total = state.next_record.load(Ordering::Relaxed);
                let mut r = json(StatusCode::OK, wire::to_json(&state.recorded()));
                r.headers_mut().insert(
                    "x-mock-recorded-total",
                    HeaderValue::from_str(&total.to_string())
                        .unwrap_or(HeaderValue::from_static("0")),
                );
                r
            }
            Method::DELETE => {
                state.clear_recorded();
                response(
                    StatusCode::NO_CONTENT,
                    "application/json",
                    MockBody::empty(),
                )
            }
            _ => error(
                Provider::OpenAi,
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed.",
            ),
        });
    }
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let seq = state
        .recording
        .load(Ordering::Relaxed)
        .then(|| state.record(&parts, &body));
    let (provider, method) = match path {
        "/v1/chat/completions" => (Provider::OpenAi, Method::POST),
        "/v1/messages" | "/v1/messages/count_tokens" => (Provider::Anthropic, Method::POST),
        "/v1/responses" | "/v1/embeddings" => (Provider::OpenAi, Method::POST),
        "/v1/models" => (Provider::OpenAi, Method::GET),
        _ => {
            let msg = format!("Unknown request URL: {} {path}.", parts.method);
            let body = wire::openai_error("invalid_request_error", &msg, Some("unknown_url"));
            return Ok(json(StatusCode::NOT_FOUND, body));
        }
    };
    if parts.method != method {
        let msg = format!("Method {} not allowed for {path}.", parts.method);
        return Ok(error(provider, StatusCode::METHOD_NOT_ALLOWED, &msg));
    }
    if !authorized(&state, provider, &parts.headers) {
        let msg = match provider {
            Provider::OpenAi => "Incorrect API key provided.",
            Provider::Anthropic => "invalid x-api-key",
        };
        return Ok(error(provider, StatusCode::UNAUTHORIZED, msg));
    }
    let knobs = Knobs::from_headers(&parts.headers);
    if knobs.first_byte_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(knobs.first_byte_delay_ms)).await;
    }
    if let Some(status) = knobs.status.and_then(|s| StatusCode::from_u16(s).ok()) {
        let msg = format!("Mock error {} injected by x-mock-status.", status.as_u16());
        return Ok(error(provider, status, &msg));
    }
    if path == "/v1/models" {
        return Ok(json(StatusCode::OK, MODELS.as_bytes().to_vec()));
    }
    let real_api = knobs.real_api.unwrap_or(state.defaults.real_api);
    if path == "/v1/responses" {
        return Ok(responses(&state, seq, real_api, &knobs, &body));
    }
    if path == "/v1/embeddings" {
        return Ok(match crate::vectors::embeddings(&body, &knobs) {
            Ok((answer, input_tokens)) => {
                if let (true, Some(seq)) = (real_api, seq) {
                    state.bill(
                        seq,
                        Billed {
                            input_tokens,
                            output_tokens: 0,
                            choices: 1,
                        },
                    );
                }
                json(StatusCode::OK, answer)
            }
            Err(msg) => error(provider, StatusCode::BAD_REQUEST, &msg),
        });
    }
    if path == "/v1/messages/count_tokens" {
        return Ok(match crate::vectors::count_tokens(&body, &knobs) {
            Ok(answer) => json(StatusCode::OK, answer),
            Err(msg) => error(provider, StatusCode::BAD_REQUEST, &msg),
        });
    }
    let parsed = match (real_api, provider) {
        (false, _) => wire::parse_request(&body),
        (true, Provider::OpenAi) => real::parse_openai(&body),
        (true, Provider::Anthropic) => real::parse_anthropic(&body),
    };
    let request = match parsed {
        Ok(r) => r,
        Err(msg) => return Ok(error(provider, StatusCode::BAD_REQUEST, &msg)),
    };
    let mut plan = Plan::new(&state.defaults, &knobs, body.len(), request.max_tokens);
    plan.choices = request.choices;
    if let (true, Some(seq)) = (real_api, seq) {
        state.bill(
            seq,
            Billed {
                input_tokens: plan.input,
                output_tokens: plan.total_output(),
                choices: plan.choices,
            },
        );
    }
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    // A scripted tool turn (`[[mock-tool NAME {JSON}]]` in the user's message): answer with the call.
    if let (Provider::Anthropic, Some(call)) = (provider, crate::tool_turns::anthropic_call(&body))
    {
        let id = format!("msg_mock_{n}");
        return Ok(if request.stream {
            stream(|events| {
                crate::tool_turns::anthropic_tool_stream(events, id, request.model, plan, call)
            })
        } else {
            whole(
                crate::tool_turns::anthropic_tool_message(&id, &request.model, &plan, &call),
                &plan,
            )
        });
    }
    Ok(match (provider, request.stream) {
        (Provider::OpenAi, false) => {
            let body = wire::openai_completion(
                &format!("chatcmpl-mock-{n}"),
                now_unix(),
                &request.model,
                &plan,
            );
            whole(body, &plan)
        }
        (Provider::Anthropic, false) => {
            let body = wire::anthropic_message(&format!("msg_mock_{n}"), &request.model, &plan);
            whole(body, &plan)
        }
        (Provider::OpenAi, true) => stream(|events| {
            wire::openai_stream(
                events,
                format!("chatcmpl-mock-{n}"),
                now_unix(),
                request.model,
                request.include_usage,
                plan,
            )
        }),
        (Provider::Anthropic, true) => stream(|events| {
            wire::anthropic_stream(events, format!("msg_mock_{n}"), request.model, plan)
        }),
    })
}

/// `POST /v1/responses` (see [`responses_api`]): read as the real API reads it in both modes (the
/// default mode refuses a duplicated `model`, `stream` or cap as it does for chat).
fn responses(
    state: &State,
    seq: Option<u64>,
    real_api: bool,
    knobs: &Knobs,
    body: &Bytes,
) -> Response<MockBody> {
    if !real_api {
        if let Err(msg) = wire::parse_request(body) {
            return error(Provider::OpenAi, StatusCode::BAD_REQUEST, &msg);
        }
    }
    let request = match responses_api::parse(body) {
        Ok(r) => r,
        Err(msg) => return error(Provider::OpenAi, StatusCode::BAD_REQUEST, &msg),
    };
    let plan = Plan::new(
        &state.defaults,
        knobs,
        body.len(),
        request.max_output_tokens,
    );
    if let (true, Some(seq)) = (real_api, seq) {
        state.bill(
            seq,
            Billed {
                input_tokens: plan.input,
                output_tokens: plan.total_output(),
                choices: 1,
            },
        );
    }
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let answer = responses_api::Answer {
        id: format!("mock{n}"),
        created: now_unix(),
        stream: request.stream,
        request,
        plan,
    };
    if answer.stream {
        stream(|events| responses_api::stream(events, answer))
    } else {
        let body = answer.body();
        whole(body, &answer.plan)
    }
}

/// A non-streamed JSON answer, or its truncated form for `x-mock-disconnect-after`.
fn whole(body: Vec<u8>, plan: &Plan) -> Response<MockBody> {
    if plan.disconnect_after.is_none() {
        return json(StatusCode::OK, body);
    }
    let (tx, rx) = mpsc::channel(wire::CHANNEL);
    tokio::spawn(Events::new(tx).truncated(body));
    response(StatusCode::OK, "application/json", MockBody::Channel(rx))
}

fn stream<F, Fut>(generate: F) -> Response<MockBody>
where
    F: FnOnce(Events) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(wire::CHANNEL);
    tokio::spawn(generate(Events::new(tx)));
    let mut resp = response(StatusCode::OK, "text/event-stream", MockBody::Channel(rx));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

const MODELS: &str = r#"{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","created":1721172741,"owned_by":"system"},{"id":"gpt-4o","object":"model","created":1715367049,"owned_by":"system"},{"id":"mock-model","object":"model","created":1700000000,"owned_by":"tollgate-mock"}]}"#;
