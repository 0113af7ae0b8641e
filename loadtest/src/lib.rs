//! Load tools for Tollgate, chiefly a fast, deterministic mock LLM provider.
//!
//! The mock speaks the real wire formats of the OpenAI Chat Completions API
//! (`POST /v1/chat/completions`) and the Anthropic Messages API
//! (`POST /v1/messages`), streamed and not streamed, so the gateway can be
//! tested and benchmarked against it. It runs on its own threads with its own
//! tokio runtime: [`spawn`] binds synchronously and never needs the caller to
//! be inside a runtime. The `tollgate-mock` binary wraps the same server.
//!
//! # Endpoints
//!
//! * `POST /v1/chat/completions`: OpenAI; `stream`, `stream_options.include_usage`,
//!   `max_tokens` and `max_completion_tokens` are honoured.
//! * `POST /v1/messages`: Anthropic; `stream` and `max_tokens` are honoured.
//! * `POST /v1/embeddings`: OpenAI embeddings (`input` in every shape, `dimensions`,
//!   `encoding_format` float or base64), billed per input token.
//! * `POST /v1/messages/count_tokens`: Anthropic token counting, `{"input_tokens": N}`.
//! * `GET /v1/models`: a small OpenAI-style model list.
//! * `GET /healthz`: `200 ok`.
//! * `GET /_mock/requests`: the last 64 requests received (every path except
//!   `/_mock/*` and `/healthz`), oldest first, as
//!   `[{"method":..,"path":..,"query":..|null,"headers":[[name,value],..],"body":".."}]`.
//!   Headers are recorded verbatim, credentials included, so tests can check
//!   what the gateway forwarded. The body is the bytes received, not
//!   re-serialised ([`RecordedRequest::body_bytes`] has them byte for byte).
//!   In real-API mode a record also carries
//!   `"billed":{"input_tokens":..,"output_tokens":..,"choices":..}`, the usage
//!   the mock billed ([`RecordedRequest::billed`]). The `x-mock-recorded-total`
//!   response header counts every request recorded since start, those pushed
//!   out of the 64 included (a test's count of what reached the provider).
//!   `DELETE /_mock/requests` clears the record.
//! * Anything else: `404` in the OpenAI error shape.
//!
//! A body that is not valid JSON, or has no string `model`, is answered `400`
//! in the provider's error shape (`invalid_request_error`).
//!
//! # Real-API mode
//!
//! By default requests are read with a strict parser (a duplicate key is a
//! `400`, `n` is ignored). [`MockDefaults::real_api`] (`--real-api`), or the
//! request header `x-mock-real-api: 1`, makes the mock read bodies as the real
//! providers do: last duplicate key wins, OpenAI `n` yields `n` choices billed
//! together, a `null` cap is no cap, `stream_options: null` streams no usage,
//! and Anthropic refuses a missing or `null` `max_tokens`. See [`real`].
//!
//! # Authentication
//!
//! When [`MockDefaults::expected_key`] is set, OpenAI paths (`/v1/chat/completions`,
//! `/v1/models`) require `authorization: Bearer <key>` and Anthropic paths
//! (`/v1/messages`) require `x-api-key: <key>`; otherwise they answer `401`
//! with the provider's error shape and type `authentication_error`. The
//! received key is never echoed.
//!
//! # Deterministic token counts
//!
//! All numbers are per request; `x-mock-*` request headers override them
//! (a header whose value is not a decimal integer is ignored).
//!
//! * **Input** `P` (OpenAI `prompt_tokens`, Anthropic `input_tokens`)
//!   = `ceil(request_body_bytes / 4)`, or `x-mock-input-tokens: N`.
//! * **Output** `C` (OpenAI `completion_tokens`, Anthropic `output_tokens`)
//!   = `min(D, M)` where `D` is `x-mock-output-tokens: N` or else
//!   [`MockDefaults::output_tokens`] (16), and `M` is the request's
//!   `max_completion_tokens`, else `max_tokens`, when present.
//!   The response stops with `finish_reason: "length"` / `stop_reason: "max_tokens"`
//!   exactly when `M < D`; otherwise `"stop"` / `"end_turn"`.
//! * OpenAI `total_tokens = P + C`.
//! * OpenAI `cached_tokens` `K` = `min(x-mock-cached-tokens (default 0), P)`.
//! * OpenAI `reasoning_tokens` `R` = `min(x-mock-reasoning-tokens (default 0), C)`;
//!   `completion_tokens` stays `C` (the reasoning tokens are part of it).
//! * Anthropic `cache_read_input_tokens` = `x-mock-cache-read-tokens` (default 0),
//!   `cache_creation.ephemeral_5m_input_tokens` `W5` = `x-mock-cache-write-5m-tokens`,
//!   `cache_creation.ephemeral_1h_input_tokens` `W1` = `x-mock-cache-write-1h-tokens`
//!   (defaults 0), `cache_creation_input_tokens = W5 + W1`. These are not
//!   clamped and not subtracted from `input_tokens` (Anthropic reports them
//!   beside it).
//! * Anthropic streams report `output_tokens: 1` in `message_start` and `C`
//!   in `message_delta`.
//! * **Text**: output token `i` (0-based) is [`WORDS`]`[i % 16]` followed by one
//!   space; the response text is the concatenation, e.g. 3 tokens give
//!   `"Hello from the "`. A stream carries one content event per token.
//!
//! # Timing and faults (request headers)
//!
//! * `x-mock-token-delay-ms: N` (default [`MockDefaults::token_delay`]): sleep
//!   before each output-token event of a stream. Non-streamed responses ignore it.
//! * `x-mock-first-byte-delay-ms: N`: sleep before sending the response headers.
//! * `x-mock-status: S` (400..=599): answer `S` with the provider's error shape
//!   instead (OpenAI types: 400 `invalid_request_error`, 401
//!   `authentication_error`, 403 `permission_error`, 404 `not_found_error`,
//!   429 `rate_limit_error`, other 4xx `invalid_request_error`, 5xx `server_error`;
//!   Anthropic: 400 `invalid_request_error`, 401 `authentication_error`, 403
//!   `permission_error`, 404 `not_found_error`, 413 `request_too_large`, 429
//!   `rate_limit_error`, 529 `overloaded_error`, other 4xx
//!   `invalid_request_error`, other 5xx `api_error`). A 429 carries `retry-after: 1`.
//!   Authentication is checked first; the body is not parsed.
//! * `x-mock-disconnect-after: N`: streams send the first `min(N, C)` token
//!   events (after the opening events) and then abort the connection: no
//!   closing events, no terminating chunk. A non-streamed response sends its
//!   headers and the first half of its JSON body, chunked, then aborts.
//! * `x-mock-malformed-sse: 1`: after the first `floor(C / 2)` token events a
//!   stream carries one event whose data is truncated JSON (OpenAI
//!   `data: {"id":\n\n`, Anthropic `event: content_block_delta\ndata: {"type":"content_block_delta","index":\n\n`),
//!   then continues normally.
//! * `x-mock-omit-usage: 1`: OpenAI leaves out `usage` (non-stream) or the
//!   final usage chunk and the `"usage":null` fields (stream); Anthropic leaves
//!   out `usage` (non-stream) or the `usage` of `message_delta` (stream).

#![forbid(unsafe_code)]

mod body;
mod knobs;
pub mod load;
pub mod real;
mod responses_api;
mod server;
mod tool_turns;
mod vectors;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use knobs::WORDS;
pub use server::{Billed, RecordedRequest};

/// Errors starting the mock.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// The runtime or its thread could not be started.
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
}

/// PEM files for serving TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM.
    pub cert_pem: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1), PEM.
    pub key_pem: PathBuf,
}

/// Per-request defaults, overridable by `x-mock-*` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockDefaults {
    /// Output tokens per response before `max_tokens` capping (16).
    pub output_tokens: u64,
    /// Sleep before each streamed output token (0).
    pub token_delay: Duration,
    /// When set, the provider endpoints require this key.
    pub expected_key: Option<String>,
    /// Real-API mode for every request (see [`real`]); `x-mock-real-api: 0|1`
    /// overrides it per request. Off by default.
    pub real_api: bool,
}

impl Default for MockDefaults {
    fn default() -> Self {
        Self {
            output_tokens: 16,
            token_delay: Duration::ZERO,
            expected_key: None,
            real_api: false,
        }
    }
}

/// How to run the mock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockConfig {
    /// Address to bind; port 0 picks a free port (see [`MockHandle::addr`]).
    pub listen: SocketAddr,
    /// Worker threads of the mock's runtime (0 means 1).
    pub threads: usize,
    /// Serve HTTPS (HTTP/1.1 only) with these files.
    pub tls: Option<TlsFiles>,
    /// Per-request defaults.
    pub defaults: MockDefaults,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            threads: 1,
            tls: None,
            defaults: MockDefaults::default(),
        }
    }
}

/// A running mock. Dropping it, or [`MockHandle::shutdown`], stops the server
/// and waits for its thread; open connections are closed.
pub struct MockHandle {
    addr: SocketAddr,
    tls: bool,
    state: Arc<server::State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockHandle")
            .field("addr", &self.addr)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl MockHandle {
    /// The bound address (the real port when port 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the mock serves TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Turns recording of requests (for `GET /_mock/requests`) on or off; on by default.
    pub fn set_recording(&self, on: bool) {
        self.state.recording.store(on, Ordering::Relaxed);
    }

    /// The recorded requests, oldest first (at most 64).
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.state.recorded()
    }

    /// Forgets the recorded requests.
    pub fn clear_recorded(&self) {
        self.state.clear_recorded();
    }

    /// Stops the server and waits for its thread to finish.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Binds `cfg.listen` and starts the mock on its own thread and runtime.
///
/// Binding and loading TLS files happen before this returns, so errors are
/// reported here and [`MockHandle::addr`] is the real address.
pub fn spawn(cfg: MockConfig) -> Result<MockHandle, MockError> {
    let acceptor = match &cfg.tls {
        Some(files) => Some(server::tls_acceptor(files)?),
        None => None,
    };
    let listener = std::net::TcpListener::bind(cfg.listen).map_err(|source| MockError::Bind {
        addr: cfg.listen,
        source,
    })?;
    listener.set_nonblocking(true).map_err(MockError::Runtime)?;
    let addr = listener.local_addr().map_err(MockError::Runtime)?;
    let threads = cfg.threads.max(1);
    let state = Arc::new(server::State::new(cfg.defaults));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let thread_state = Arc::clone(&state);
    // The runtime lives and dies on its own thread, so the caller may or may
    // not be inside a runtime of its own.
    let thread = std::thread::Builder::new()
        .name("tollgate-mock-main".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("tollgate-mock")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            runtime.block_on(server::serve(listener, acceptor, thread_state, stop_rx));
            runtime.shutdown_timeout(Duration::from_millis(200));
        })
        .map_err(MockError::Runtime)?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(MockError::Runtime(e));
        }
        Err(_) => {
            let _ = thread.join();
            return Err(MockError::Runtime(std::io::Error::other(
                "the mock thread ended before starting",
            )));
        }
    }
    Ok(MockHandle {
        addr,
        tls: cfg.tls.is_some(),
        state,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}
