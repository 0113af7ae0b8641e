//! What each provider API means on the wire: one home per API.
//!
//! Owns: [`Api`], the closed set of wire APIs the gateway speaks, one variant per API, and the dispatch to
//! each API's file: [`openai`] (chat completions), [`openai_responses`] (responses, served by `openai`
//! providers; it shares chat's credential, headers, error shape and model list), [`anthropic`] (messages,
//! and its free token counting) and [`embeddings`] (OpenAI embeddings, served by OpenAI-kind providers: its
//! credential, errors and model list are OpenAI's, see [`Api::family`]). Each file holds everything
//! its API means: the paths it serves, the upstream credential and version headers, the output-cap field,
//! stream usage (asking for it, stripping it), usage extraction, the error body and its mid-stream event,
//! the `/v1/models` shape, the final events of a cut-off stream, and where prompt and generated text live for
//! estimates. [`meter`] is the shared usage-metering skeleton (which events to parse, SSE data extraction)
//! around the per-API parsers; [`json`] holds the byte and JSON helpers the API files share. The pipeline, `spend` and `runtime` call these methods and never match on a
//! provider themselves; this module imports only `net::sse`, `error` and tollgate-core types, never the
//! pipeline. Imports within it go one way: `meter` uses this file, this file uses the API files, the API
//! files use `json`; an API file never imports this file or `meter` (no circles). Adding an API: see `docs/providers.md`.
//!
//! Dispatch is static: every method is a `match` on a `Copy` enum that calls a plain function (no trait
//! objects, no allocation beyond what the API itself needs), so the hot path stays monomorphic and inlinable.
//!
//! Fails: never on its own; each method's failure is documented on it (only
//! [`Api::request_stream_usage`] returns an error: a body that cannot take the member it needs, a 400).
//! Cost: a `match` per call; what each API function costs is documented in its file.

pub mod anthropic;
pub mod embeddings;
pub mod json;
pub mod meter;
pub mod openai;
pub mod openai_responses;
pub mod request;

pub use request::Billing;

pub use json::insert_member;

use std::fmt;

use bytes::Bytes;
use tollgate_core::{ProviderKind, Usage};

use crate::error::{Error, Result};

/// A wire API a provider speaks and a client calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// OpenAI chat completions (`POST /v1/chat/completions`), see [`openai`].
    OpenAi,
    /// Anthropic messages (`POST /v1/messages`), see [`anthropic`].
    Anthropic,
    /// OpenAI responses (`POST /v1/responses`), see [`openai_responses`]; served by `openai` providers.
    OpenAiResponses,
    /// OpenAI embeddings (`POST /v1/embeddings`), see [`embeddings`]; served by OpenAI-kind providers.
    Embeddings,
}

impl Api {
    /// Every API, in the order paths and SDK headers are matched.
    pub const ALL: [Api; 4] = [
        Api::OpenAi,
        Api::Anthropic,
        Api::OpenAiResponses,
        Api::Embeddings,
    ];

    /// The shape for a client that shows no sign of a particular API (no known path, no SDK header).
    pub const DEFAULT: Api = Api::OpenAi;

    /// The API a configured provider kind speaks.
    pub fn of(kind: ProviderKind) -> Api {
        match kind {
            ProviderKind::OpenAi => Api::OpenAi,
            ProviderKind::Anthropic => Api::Anthropic,
        }
    }

    /// The name in logs (`api` field); for a provider's own API, its configuration `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Anthropic => "anthropic",
            Api::OpenAiResponses => "openai_responses",
            Api::Embeddings => "embeddings",
        }
    }

    /// The provider kind that serves this API (a provider of that kind serves every API whose kind it is).
    pub fn kind(self) -> ProviderKind {
        match self {
            Api::OpenAi | Api::OpenAiResponses | Api::Embeddings => ProviderKind::OpenAi,
            Api::Anthropic => ProviderKind::Anthropic,
        }
    }

    /// The smallest output cap the API accepts (a lowered cap below it would be refused by the provider).
    pub fn min_cap(self) -> u64 {
        match self {
            Api::OpenAi | Api::Anthropic | Api::Embeddings => 1,
            Api::OpenAiResponses => openai_responses::MIN_CAP,
        }
    }

    /// Whether a request with no cap of its own is sent with the cap it is reserved at (the gateway's
    /// default), so the provider enforces it: for APIs whose models' hidden reasoning a stream cut-off
    /// cannot count (Responses, the API of reasoning agents such as Codex).
    pub fn enforces_default_cap(self) -> bool {
        match self {
            Api::OpenAi | Api::Anthropic | Api::Embeddings => false,
            Api::OpenAiResponses => true,
        }
    }

    /// The API of the providers that serve this one ([`Api::of`] their kind): its credential header, default
    /// headers, error shape and model list. An API is its own family, except responses and embeddings
    /// (OpenAI's).
    pub fn family(self) -> Api {
        match self {
            Api::OpenAi | Api::OpenAiResponses | Api::Embeddings => Api::OpenAi,
            Api::Anthropic => Api::Anthropic,
        }
    }

    /// The request paths this API is served on; the first is the one named in errors.
    pub fn paths(self) -> &'static [&'static str] {
        match self {
            Api::OpenAi => openai::PATHS,
            Api::Anthropic => anthropic::PATHS,
            Api::OpenAiResponses => openai_responses::PATHS,
            Api::Embeddings => embeddings::PATHS,
        }
    }

    /// The API whose path this is.
    pub fn for_path(path: &str) -> Option<Api> {
        Api::ALL.into_iter().find(|a| a.paths().contains(&path))
    }

    /// The request header this API's SDKs always send, if one tells it apart.
    pub fn sdk_header(self) -> Option<&'static str> {
        match self {
            Api::OpenAi | Api::OpenAiResponses | Api::Embeddings => None,
            Api::Anthropic => Some(anthropic::SDK_HEADER),
        }
    }

    /// The API a client speaks when its path does not say (unknown paths, `/v1/models`): the first whose
    /// SDK header it sent, else [`Api::DEFAULT`]. `has_header(name)`: the request carries that header.
    pub fn sniff(has_header: impl Fn(&str) -> bool) -> Api {
        Api::ALL
            .into_iter()
            .find(|a| a.sdk_header().is_some_and(&has_header))
            .unwrap_or(Api::DEFAULT)
    }

    /// Appends the upstream credential header line(s) carrying `key` (rendered once per snapshot).
    pub fn auth_lines(self, key: &str, out: &mut Vec<u8>) {
        match self {
            Api::OpenAi | Api::OpenAiResponses | Api::Embeddings => openai::auth_lines(key, out),
            Api::Anthropic => anthropic::auth_lines(key, out),
        }
    }

    /// Headers sent upstream when the client sent none of that name (`name`, `value`), e.g. an API version.
    pub fn default_headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Api::OpenAi | Api::OpenAiResponses | Api::Embeddings => openai::DEFAULT_HEADERS,
            Api::Anthropic => anthropic::DEFAULT_HEADERS,
        }
    }

    /// Reads what the request will make the provider generate and bill; 400 naming the field for a value
    /// the provider would read differently, or a field whose cost the gateway cannot bound.
    pub fn view(self, body: &request::Body<'_>) -> Result<Billing> {
        match self {
            Api::OpenAi => openai::view(body),
            Api::Anthropic => anthropic::view(body),
            Api::OpenAiResponses => openai_responses::view(body),
            Api::Embeddings => embeddings::view(body),
        }
    }

    /// The body with its output cap set to `n` as the provider reads it: every cap field the body has is
    /// rewritten in place (a `null` included), or the API's field is added when it has none. Anthropic's
    /// extended thinking is fitted below the new cap ([`anthropic::fit_thinking`]; 400 when it cannot be).
    /// Embeddings have no output to cap: the body is returned as it is.
    pub fn set_cap(self, body: &Bytes, n: u64) -> Result<Bytes> {
        let parsed = request::Body::parse(body)?;
        let value = n.to_string();
        match self {
            Api::OpenAi => {
                parsed.set_member(openai::CAP_FIELDS, &value, &openai::max_tokens_member(n))
            }
            Api::Anthropic => {
                let thinking = anthropic::fit_thinking(&parsed, n)?;
                let out = parsed.set_member(
                    anthropic::CAP_FIELDS,
                    &value,
                    &anthropic::max_tokens_member(n),
                )?;
                match thinking {
                    None => Ok(out),
                    Some(t) => request::Body::parse(&out)?.set_member(&["thinking"], &t, ""),
                }
            }
            Api::OpenAiResponses => parsed.set_member(
                openai_responses::CAP_FIELDS,
                &value,
                &openai_responses::max_tokens_member(n),
            ),
            Api::Embeddings => Ok(body.clone()),
        }
    }

    /// The output cap as a body member (`"name":n,`) to splice after the opening brace.
    pub fn max_tokens_member(self, n: u64) -> String {
        match self {
            Api::OpenAi => openai::max_tokens_member(n),
            Api::Anthropic => anthropic::max_tokens_member(n),
            Api::OpenAiResponses => openai_responses::max_tokens_member(n),
            Api::Embeddings => String::new(),
        }
    }

    /// For a streamed request: the upstream body that asks the provider for usage the client did not ask
    /// for, or `None` when nothing needs asking (the response then needs no [`Api::strip_stream_usage`]).
    /// `client_asked`: the client asked for stream usage itself; `has_options`: it sent `stream_options`.
    /// Fails with a 400 when the body cannot take what must be added.
    pub fn request_stream_usage(
        self,
        body: &Bytes,
        client_asked: bool,
        has_options: bool,
    ) -> Result<Option<Bytes>> {
        match self {
            Api::OpenAi => openai::request_stream_usage(body, client_asked, has_options),
            // Responses streams always end with the usage (`response.completed`).
            Api::Anthropic | Api::OpenAiResponses | Api::Embeddings => Ok(None),
        }
    }

    /// Takes the usage Tollgate asked for out of a run of stream events (see
    /// [`Api::request_stream_usage`]); `None` when nothing is left of the run.
    pub fn strip_stream_usage(self, run: Bytes) -> Option<Bytes> {
        match self {
            Api::OpenAi => openai::strip_stream_usage(run),
            Api::Anthropic | Api::OpenAiResponses | Api::Embeddings => Some(run),
        }
    }

    /// The error `type` this API's SDK expects for `e`.
    pub fn error_type(self, e: &Error) -> &'static str {
        match self {
            Api::OpenAi | Api::OpenAiResponses | Api::Embeddings => openai::error_type(e),
            Api::Anthropic => anthropic::error_type(e),
        }
    }

    /// The JSON error body in this API's shape.
    pub fn error_body(self, e: &Error) -> Vec<u8> {
        let v = match self {
            Api::OpenAi | Api::OpenAiResponses | Api::Embeddings => openai::error_json(e),
            Api::Anthropic => anthropic::error_json(e),
        };
        serde_json::to_vec(&v)
            .unwrap_or_else(|_| b"{\"error\":{\"message\":\"internal error\"}}".to_vec())
    }

    /// The mid-stream error event this API's SDK surfaces, holding [`Api::error_body`].
    pub fn stream_error_event(self, e: &Error) -> Vec<u8> {
        let body = String::from_utf8(self.error_body(e)).unwrap_or_default();
        match self {
            Api::OpenAi | Api::Embeddings => openai::stream_error_event(&body),
            Api::Anthropic => anthropic::stream_error_event(&body),
            Api::OpenAiResponses => openai_responses::stream_error_event(e),
        }
    }

    /// `GET /v1/models` in this API's shape; `names` are (model, owning provider).
    pub fn models_body(self, names: &[(&str, &str)]) -> Vec<u8> {
        let v = match self {
            Api::OpenAi | Api::OpenAiResponses | Api::Embeddings => openai::models_list(names),
            Api::Anthropic => anthropic::models_list(names),
        };
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// Appends a request body's prompt text (messages separated by newlines) and returns how many messages
    /// it has; for estimates.
    pub fn prompt_text(
        self,
        obj: &serde_json::Map<String, serde_json::Value>,
        out: &mut String,
    ) -> u64 {
        match self {
            Api::OpenAi => openai::prompt_text(obj, out),
            Api::Anthropic => anthropic::prompt_text(obj, out),
            Api::OpenAiResponses => openai_responses::prompt_text(obj, out),
            Api::Embeddings => embeddings::prompt_text(obj, out),
        }
    }

    /// Appends the generated text in one stream event's data or a whole response body; for estimates and
    /// stream cut-off.
    pub fn generated_text(self, v: &serde_json::Value, out: &mut String) {
        match self {
            Api::OpenAi => openai::generated_text(v, out),
            Api::Anthropic => anthropic::generated_text(v, out),
            Api::OpenAiResponses => openai_responses::generated_text(v, out),
            Api::Embeddings => embeddings::generated_text(v, out),
        }
    }
}

impl From<ProviderKind> for Api {
    fn from(kind: ProviderKind) -> Api {
        Api::of(kind)
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One response's usage parser, per API (see [`meter::UsageMeter`], which feeds it).
#[derive(Debug)]
pub enum Meter {
    OpenAi(openai::Meter),
    Anthropic(anthropic::Meter),
    OpenAiResponses(openai_responses::Meter),
    Embeddings(embeddings::Meter),
}

impl Meter {
    pub fn new(api: Api) -> Meter {
        match api {
            Api::OpenAi => Meter::OpenAi(openai::Meter::default()),
            Api::Anthropic => Meter::Anthropic(anthropic::Meter::default()),
            Api::OpenAiResponses => Meter::OpenAiResponses(openai_responses::Meter::default()),
            Api::Embeddings => Meter::Embeddings(embeddings::Meter::default()),
        }
    }

    /// Parses one JSON document in place; `false` when it is not JSON of the API's shape.
    pub fn observe(&mut self, json: &mut [u8]) -> bool {
        match self {
            Meter::OpenAi(m) => m.observe(json),
            Meter::Anthropic(m) => m.observe(json),
            Meter::OpenAiResponses(m) => m.observe(json),
            Meter::Embeddings(m) => m.observe(json),
        }
    }

    /// The usage the provider reported, once it is complete.
    pub fn usage(&self) -> Option<Usage> {
        match self {
            Meter::OpenAi(m) => m.usage(),
            Meter::Anthropic(m) => m.usage(),
            Meter::OpenAiResponses(m) => m.usage(),
            Meter::Embeddings(m) => m.usage(),
        }
    }

    /// Reported input and output so far.
    pub fn partial(&self) -> (Option<u64>, Option<u64>) {
        match self {
            Meter::OpenAi(m) => m.partial(),
            Meter::Anthropic(m) => m.partial(),
            Meter::OpenAiResponses(m) => m.partial(),
            Meter::Embeddings(m) => m.partial(),
        }
    }
}

/// What a stream needs to end well-formed after a cut, per API: tracked over the relayed runs, rendered by
/// [`StreamEnd::tail`].
#[derive(Debug, Clone)]
pub enum StreamEnd {
    OpenAi(openai::StreamEnd),
    Anthropic(anthropic::StreamEnd),
    OpenAiResponses(openai_responses::StreamEnd),
    Embeddings(embeddings::StreamEnd),
}

impl StreamEnd {
    pub fn new(api: Api) -> StreamEnd {
        match api {
            Api::OpenAi => StreamEnd::OpenAi(openai::StreamEnd::default()),
            Api::Anthropic => StreamEnd::Anthropic(anthropic::StreamEnd::default()),
            Api::OpenAiResponses => {
                StreamEnd::OpenAiResponses(openai_responses::StreamEnd::default())
            }
            Api::Embeddings => StreamEnd::Embeddings(embeddings::StreamEnd),
        }
    }

    /// Observes a run of complete events about to be relayed.
    pub fn track(&mut self, run: &Bytes) {
        match self {
            StreamEnd::OpenAi(s) => s.track(run),
            StreamEnd::Anthropic(s) => s.track(run),
            StreamEnd::OpenAiResponses(s) => s.track(run),
            StreamEnd::Embeddings(s) => s.track(run),
        }
    }

    /// The events that end the client's stream after the cut; `output_tokens`: the output counted.
    pub fn tail(&self, output_tokens: u64) -> Vec<u8> {
        match self {
            StreamEnd::OpenAi(s) => s.tail(),
            StreamEnd::Anthropic(s) => s.tail(output_tokens),
            StreamEnd::OpenAiResponses(s) => s.tail(output_tokens),
            StreamEnd::Embeddings(s) => s.tail(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 400s a careless client's body gets from each API's view, each naming the field.
    #[test]
    fn views_refuse_what_the_provider_would_read_otherwise_naming_the_field() {
        use crate::error::ErrorKind;
        let refused = |api: Api, body: &str| {
            let parsed = request::Body::parse(body.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
            match api.view(&parsed) {
                Ok(b) => panic!("{body} was accepted as {b:?}"),
                Err(e) => e,
            }
        };
        for (body, field) in [
            (r#"{"model":"m","n":0}"#, "`n`"),
            (r#"{"model":"m","n":129}"#, "`n`"),
            (r#"{"model":"m","max_tokens":"100"}"#, "`max_tokens`"),
            (r#"{"model":"m","stream":"yes"}"#, "`stream`"),
            (
                r#"{"model":"m","stream":true,"stream_options":5}"#,
                "`stream_options`",
            ),
        ] {
            let e = refused(Api::OpenAi, body);
            assert_eq!(e.kind, ErrorKind::InvalidBody, "{body}");
            assert!(e.message.contains(field), "{body}: {}", e.message);
        }
        for (body, field) in [
            (r#"{"model":"m","service_tier":"priority"}"#, "service_tier"),
            (
                r#"{"model":"m","prediction":{"type":"content","content":"x"}}"#,
                "prediction",
            ),
            (r#"{"model":"m","audio":{"voice":"alloy"}}"#, "audio"),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{}}]}]}"#,
                "file",
            ),
        ] {
            let e = refused(Api::OpenAi, body);
            assert_eq!(e.kind, ErrorKind::UnboundedCost, "{body}");
            assert!(e.message.contains(field), "{body}: {}", e.message);
        }
        let e = refused(Api::Anthropic, r#"{"model":"m","messages":[]}"#);
        assert!(
            e.message.contains("`max_tokens` is required"),
            "{}",
            e.message
        );
        let e = refused(
            Api::Anthropic,
            r#"{"model":"m","max_tokens":9,"messages":[{"role":"user","content":[{"type":"document","source":{"type":"url","url":"u"}}]}]}"#,
        );
        assert_eq!(e.kind, ErrorKind::UnboundedCost);
        // What is accepted reads as the provider reads it.
        let ok = request::Body::parse(
            br#"{"model":"m","n":3,"max_tokens":9,"max_completion_tokens":null,"service_tier":"flex"}"#,
        )
        .unwrap();
        let b = Api::OpenAi.view(&ok).unwrap();
        assert_eq!((b.cap, b.choices, b.stream), (Some(9), 3, false));
    }

    #[test]
    fn a_lowered_anthropic_cap_fits_thinking_below_it() {
        let b = r#"{"max_tokens":32000,"thinking":{"type":"enabled","budget_tokens":31999}}"#;
        let out = Api::Anthropic
            .set_cap(&Bytes::from_static(b.as_bytes()), 4096)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (
                v["max_tokens"].as_u64(),
                v["thinking"]["budget_tokens"].as_u64()
            ),
            (Some(4096), Some(4095))
        );
        request::Body::parse(&out).unwrap();
        let e = Api::Anthropic
            .set_cap(&Bytes::from_static(b.as_bytes()), 1000)
            .unwrap_err();
        assert_eq!(e.status(), 400);
        // Embeddings have no output cap: the body is untouched.
        let emb = Bytes::from_static(br#"{"model":"m","input":"x"}"#);
        assert_eq!(Api::Embeddings.set_cap(&emb, 5).unwrap(), emb);
    }

    #[test]
    fn shapes_match_the_providers() {
        let e = Error::unknown_model("model \"x\" is not routed");
        let v: serde_json::Value = serde_json::from_slice(&Api::OpenAi.error_body(&e)).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(e.status(), 404);
        let v: serde_json::Value = serde_json::from_slice(&Api::Anthropic.error_body(&e)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["error"]["message"], "model \"x\" is not routed");
    }

    #[test]
    fn every_api_has_a_home() {
        for api in Api::ALL {
            assert_eq!(Api::for_path(api.paths()[0]), Some(api));
            if let Some(h) = api.sdk_header() {
                assert_eq!(Api::sniff(|n| n == h), api);
            }
        }
        assert_eq!(Api::sniff(|_| false), Api::DEFAULT);
        assert_eq!(Api::for_path("/v1/embeddings"), Some(Api::Embeddings));
        assert_eq!(Api::for_path("/v1/responses"), Some(Api::OpenAiResponses));
        // Every path without `/v1` is its `/v1` path's alias.
        for api in Api::ALL {
            for p in api.paths() {
                assert_eq!(Api::for_path(p), Some(api));
            }
            assert_eq!(api.paths()[1..], [api.paths()[0].trim_start_matches("/v1")]);
            // Every API is served by a provider kind's API.
            assert_eq!(api.family().family(), api.family());
            assert_eq!(Api::of(api.kind()), api.family());
        }
        // A configured kind speaks the API of the same name, and serves every API of its kind.
        for kind in [ProviderKind::OpenAi, ProviderKind::Anthropic] {
            assert_eq!(Api::of(kind).as_str(), kind.as_str());
            assert_eq!(Api::of(kind).family(), Api::of(kind));
            assert_eq!(Api::of(kind).kind(), kind);
        }
        assert_eq!(Api::OpenAiResponses.kind(), ProviderKind::OpenAi);
        assert_eq!(Api::for_path("/v1/responses"), Some(Api::OpenAiResponses));
    }

    #[test]
    fn upstream_headers_and_body_members_are_each_apis() {
        let mut out = Vec::new();
        Api::OpenAi.auth_lines("k1", &mut out);
        Api::Anthropic.auth_lines("k2", &mut out);
        assert_eq!(
            &out[..],
            b"authorization: Bearer k1\r\nx-api-key: k2\r\n".as_slice()
        );
        assert!(Api::OpenAi.default_headers().is_empty());
        assert_eq!(
            Api::Anthropic.default_headers(),
            &[("anthropic-version", "2023-06-01")]
        );
        assert_eq!(
            Api::OpenAi.max_tokens_member(7),
            "\"max_completion_tokens\":7,"
        );
        assert_eq!(Api::Anthropic.max_tokens_member(7), "\"max_tokens\":7,");
        let body = Bytes::from_static(br#"{"model":"m","stream":true}"#);
        assert!(Api::Anthropic
            .request_stream_usage(&body, false, false)
            .unwrap()
            .is_none());
        assert!(Api::OpenAi
            .request_stream_usage(&body, true, true)
            .unwrap()
            .is_none());
        assert!(Api::OpenAi
            .request_stream_usage(&body, false, false)
            .unwrap()
            .is_some());
    }

    #[test]
    fn mid_stream_errors_and_cut_tails_are_in_each_apis_protocol() {
        let e = Error::upstream_timeout("slow");
        let oa = String::from_utf8(Api::OpenAi.stream_error_event(&e)).unwrap();
        assert!(oa.starts_with("data: {\"error\":") && oa.ends_with("\n\n"));
        let an = String::from_utf8(Api::Anthropic.stream_error_event(&e)).unwrap();
        assert!(an.starts_with("event: error\ndata: {") && an.contains("timeout_error"));
        let tail = String::from_utf8(StreamEnd::new(Api::OpenAi).tail(5)).unwrap();
        assert!(
            tail.contains("\"finish_reason\":\"length\"") && tail.ends_with("data: [DONE]\n\n")
        );
        let tail = String::from_utf8(StreamEnd::new(Api::Anthropic).tail(5)).unwrap();
        assert!(tail.starts_with("event: message_delta") && tail.contains("\"output_tokens\":5"));
    }
}
