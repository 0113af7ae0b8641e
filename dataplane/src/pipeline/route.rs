//! Phase 3, route: which endpoint was called, which model it names, and which provider serves it.
//!
//! Owns: endpoint classification by method and path, the one parse of the request body (`serde_json` into a
//! borrowed probe that skips every field but `model` and `stream`, so nothing is allocated for the prompt),
//! route lookup (exact names before globs), and the upstream body: the client's bytes unchanged (a refcount,
//! no copy) unless the route renames the model, in which case exactly one splice replaces the name; and the
//! model's canonical price-sheet name (one hash lookup in the snapshot's price book, a shared string),
//! which the authorize and admit phases match policies and budget model filters against.
//!
//! Which paths are API endpoints, and what each API needs added to the body, is the API's own
//! ([`crate::providers::Api`]). Every API path is also served without its `/v1` prefix, as an alias
//! forwarded upstream to the `/v1` path (see `docs/providers.md`); `/v1/messages/count_tokens` is Anthropic's
//! free token counting ([`Endpoint::CountTokens`]).
//!
//! Fails: bad JSON or a missing `model` is 400, an unrouted model 404, a model whose provider speaks
//! another API 400 naming the endpoint to call. Cost: one validating pass over the body (~1 GB/s).

use std::borrow::Cow;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::net::http1::{Method, RequestHead};
use crate::providers::request::Body;
use crate::providers::Api;
use crate::runtime::snapshot::{ProviderRuntime, Snapshot};
use bytes::{Bytes, BytesMut};

use super::ctx::Endpoint;

/// Classifies the request. Errors in the API's shape for its chat path even when the method is wrong.
pub fn endpoint(head: &RequestHead) -> std::result::Result<Endpoint, (Error, Api)> {
    let path = head.path();
    let (ep, allowed) = match path {
        "/v1/models" | "/models" => (Endpoint::Models, Method::Get),
        p if crate::providers::anthropic::COUNT_TOKENS_PATHS.contains(&p) => {
            (Endpoint::CountTokens, Method::Post)
        }
        "/healthz" => (Endpoint::Healthz, Method::Get),
        "/readyz" => (Endpoint::Readyz, Method::Get),
        other => {
            if let Some(api) = Api::for_path(other) {
                (Endpoint::Chat(api), Method::Post)
            } else {
                let shape = Api::sniff(|h| head.header(h).is_some());
                return Err((
                    Error::not_found(format!("no such endpoint: {}", truncate(other, 128))),
                    shape,
                ));
            }
        }
    };
    let ok = head.method == allowed || (allowed == Method::Get && head.method == Method::Head);
    if ok {
        Ok(ep)
    } else {
        Err((
            Error::method_not_allowed(format!(
                "{} {} is not supported; use {}",
                head.method_str(),
                head.path(),
                match allowed {
                    Method::Get => "GET",
                    _ => "POST",
                }
            )),
            ep.api(),
        ))
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The outcome of routing a chat request.
#[derive(Debug)]
pub struct Routed {
    /// The API the client called (the provider's kind serves it): what reads and rewrites the body.
    pub api: Api,
    /// The request makes the provider read input its body does not show (see [`Api::view`]).
    pub stored_input: bool,
    pub model: String,
    pub stream: bool,
    pub provider: Arc<ProviderRuntime>,
    pub route: String,
    pub upstream_model: Option<String>,
    /// The canonical price-sheet name of the model the provider will bill (the upstream name, or the
    /// requested one), when the sheet lists it: what policies and budget model filters also match
    /// (`gpt-4o` covers `gpt-4o-2024-08-06`). Shared with the snapshot's price book: no copy.
    pub canonical_model: Option<Arc<str>>,
    /// The body to send upstream.
    pub body: Bytes,
    /// Tollgate asked the provider for usage the client did not ask for (see
    /// [`Api::request_stream_usage`]), so it must be taken out of the client's stream.
    pub strip_usage: bool,
    /// The output cap of each choice as the provider will apply it (see [`Api::view`]); `None`: uncapped.
    pub max_tokens: Option<u64>,
    /// Choices the provider will generate (OpenAI `n`), each up to the cap.
    pub choices: u64,
    /// The route's `default_max_tokens`.
    pub default_max_tokens: Option<u64>,
    /// The API's own bound on the input tokens (embeddings), else `None`: the body's byte bound.
    pub input_tokens: Option<u64>,
}

impl Routed {
    /// Sets the request's output cap to `n`, as the provider will read it: every cap field the body has is
    /// rewritten in place (a `null` included), or the API's field is added ([`Api::set_cap`]). The one way
    /// a phase lowers or sets a cap (a policy's, a route's default, a budget's).
    pub fn set_max_tokens(&mut self, n: u64) -> Result<()> {
        self.body = self.api.set_cap(&self.body, n)?;
        self.max_tokens = Some(n);
        Ok(())
    }
}

/// Routes a request to an API endpoint by the `model` in its body.
pub fn route(snap: &Snapshot, ep: Endpoint, body: &Bytes) -> Result<Routed> {
    if body.is_empty() {
        return Err(Error::invalid_body(
            "request body is empty; expected a JSON object",
        ));
    }
    // The one strict read of the body: the provider executes exactly what is priced from here on.
    let view = Body::parse(body)?;
    let model = match view.string("model")? {
        Some(m) if !m.is_empty() => m,
        _ => return Err(Error::invalid_body("request body has no \"model\"")),
    };
    let Some(route) = snap.config.route_for(&model) else {
        return Err(Error::unknown_model(format!(
            "the model `{}` does not exist or is not routed by this gateway",
            truncate(&model, 256)
        )));
    };
    let provider = snap
        .providers
        .get(route.provider)
        .cloned()
        .ok_or_else(|| Error::internal("route points at a missing provider"))?;
    // The API the client called; a provider serves it when it speaks the API's family (an `openai`
    // provider serves chat completions, responses and embeddings).
    let api = ep.api();
    if Some(provider.api) != ep.provider_api() {
        let right = provider.api.paths()[0];
        return Err(Error::bad_request(format!(
            "the model `{}` is served by provider {} ({} API); send it to {right}",
            truncate(&model, 256),
            provider.name,
            provider.kind
        )));
    }
    let mut upstream_body = match &route.upstream_model {
        Some(um) if um.as_str() != model.as_ref() => rename_model(body, &model, um)?,
        _ => body.clone(),
    };
    let billing = match ep {
        Endpoint::CountTokens => crate::providers::anthropic::count_tokens_view(&view)?,
        _ => api.view(&view)?,
    };
    // Some APIs stream usage only when asked (OpenAI's `stream_options.include_usage`): ask for it on the
    // client's behalf, and remember to hand the client exactly the stream it asked for.
    let stream = billing.stream;
    let mut strip_usage = false;
    if stream {
        if let Some(b) = api.request_stream_usage(
            &upstream_body,
            billing.client_usage,
            view.get("stream_options").is_some(),
        )? {
            upstream_body = b;
            strip_usage = true;
        }
    }
    // One model identity: resolved once here, matched by the authorize and admit phases.
    let billed = route.upstream_model.as_deref().unwrap_or(&model);
    let canonical_model = snap.config.prices.canonical(provider.kind, billed).cloned();
    Ok(Routed {
        api,
        stored_input: billing.stored_input,
        canonical_model,
        strip_usage,
        max_tokens: billing.cap,
        choices: billing.choices,
        default_max_tokens: route.default_max_tokens,
        input_tokens: billing.input_tokens,
        model: model.into_owned(),
        stream,
        provider,
        route: route.pattern.as_str().to_owned(),
        upstream_model: route.upstream_model.clone(),
        body: upstream_body,
    })
}

/// Replaces the top-level `model` value with `new`. When the client's name borrowed straight from the body
/// (no escapes), that is one splice around its byte range; otherwise the body is re-serialised (rare).
#[allow(clippy::ptr_arg)] // Borrowed vs owned is the information this function needs.
fn rename_model(body: &Bytes, model: &Cow<'_, str>, new: &str) -> Result<Bytes> {
    if let Cow::Borrowed(s) = model {
        let start = (s.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
        let end = start + s.len();
        if end <= body.len()
            && start >= 1
            && body.get(start - 1) == Some(&b'"')
            && body.get(end) == Some(&b'"')
        {
            let mut out = BytesMut::with_capacity(body.len() + new.len());
            out.extend_from_slice(&body[..start]);
            out.extend_from_slice(new.as_bytes());
            out.extend_from_slice(&body[end..]);
            return Ok(out.freeze());
        }
    }
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid_body(format!("invalid JSON: {e}")))?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("model".into(), serde_json::Value::String(new.to_owned()));
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|_| Error::internal("could not re-encode the request body"))
}

/// The body with its top-level `model` replaced by `model` (a budget's downgrade; a re-encode, rare).
pub fn with_model(body: &Bytes, model: &str) -> Result<Bytes> {
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid_body(format!("invalid JSON: {e}")))?;
    match v.as_object_mut() {
        Some(obj) => {
            obj.insert("model".into(), serde_json::Value::String(model.to_owned()));
        }
        None => return Err(Error::invalid_body("request body is not a JSON object")),
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|_| Error::internal("could not re-encode the request body"))
}

pub use crate::providers::insert_member;

/// `GET /v1/models`: the concrete models the caller may use, in the OpenAI shape or, for Anthropic SDK
/// callers, Anthropic's: every exactly-named route, then, for each glob route, the models of its provider's
/// price sheet that the route serves (the glob matches them, no earlier route takes them, and they have a
/// price today), each once. `allowed` filters it to what the caller's policies permit, asked with the same
/// names (requested, upstream, canonical) the authorize phase uses, so the list and the decision agree.
pub fn models_body(
    snap: &Snapshot,
    shape: Api,
    allowed: &dyn Fn(&tollgate_core::PolicyRequest<'_>) -> bool,
) -> Vec<u8> {
    let config = &snap.config;
    let now = jiff::Timestamp::now();
    // (model, provider, upstream model, the provider's kind)
    let mut candidates: Vec<(&str, &ProviderRuntime, Option<&str>)> = Vec::new();
    for r in config.routes.iter().filter(|r| !r.pattern.is_glob()) {
        if let Some(p) = snap.providers.get(r.provider) {
            candidates.push((r.pattern.as_str(), p, r.upstream_model.as_deref()));
        }
    }
    for r in config.routes.iter().filter(|r| r.pattern.is_glob()) {
        let Some(p) = snap.providers.get(r.provider) else {
            continue;
        };
        for m in config.prices.models(p.kind) {
            let served_here = r.pattern.matches(m)
                && config
                    .route_for(m)
                    .is_some_and(|first| std::ptr::eq(first, r));
            let billed = r.upstream_model.as_deref().unwrap_or(m);
            if served_here
                && config
                    .prices
                    .price_at_timestamp(p.kind, billed, now)
                    .is_ok()
                && !candidates.iter().any(|(n, _, _)| *n == &**m)
            {
                candidates.push((m, p, r.upstream_model.as_deref()));
            }
        }
    }
    let names: Vec<(&str, &str)> = candidates
        .into_iter()
        .filter(|(model, p, upstream)| {
            let billed = upstream.unwrap_or(model);
            allowed(&tollgate_core::PolicyRequest {
                model,
                upstream_model: *upstream,
                canonical_model: config.prices.canonical(p.kind, billed).map(|c| &**c),
                provider: p.name.as_str(),
            })
        })
        .map(|(model, p, _)| (model, p.name.as_str()))
        .collect();
    shape.models_body(&names)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rename_splices_only_the_name() {
        let body = Bytes::from_static(
            br#"{"messages":[{"role":"user","content":"model"}],"model":"fast","stream":true}"#,
        );
        let view = Body::parse(&body).unwrap();
        let m = view.string("model").unwrap().unwrap();
        assert!(matches!(m, Cow::Borrowed(_)));
        let out = rename_model(&body, &m, "gpt-4o-mini").unwrap();
        assert_eq!(
            &out[..],
            br#"{"messages":[{"role":"user","content":"model"}],"model":"gpt-4o-mini","stream":true}"#
        );
    }

    #[test]
    fn rename_with_escapes_reencodes() {
        let body = Bytes::from_static(br#"{"model":"fa\u0073t","x":1}"#);
        let view = Body::parse(&body).unwrap();
        let m = view.string("model").unwrap().unwrap();
        assert!(matches!(m, Cow::Owned(_)));
        let out = rename_model(&body, &m, "real").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "real");
        assert_eq!(v["x"], 1);
    }
}
